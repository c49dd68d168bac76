"""boto3's License Manager client, with its own parameter validation, against the emulator.

The emulator serves License Manager's checkout operations for contract pricing next to the
Metering Service, on the same endpoint (docs/emulator.md, License Manager).
"""

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError

from test_clients import PRODUCT, Emulator

import boto3

BUYER_KEY = "AKIDLMBUYER"
FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
LICENSE = "arn:aws:license-manager::111122223333:license:l-0123456789abcdef0123456789abcdef"

CONFIG = f"""
[quotas.accounts]
{BUYER_KEY} = "111122223333"

[[products]]
code = "{PRODUCT}"
dimensions = ["requests"]

[[licenses]]
arn = "{LICENSE}"
customer_aws_account_id = "111122223333"
product_code = "{PRODUCT}"
provisional_ttl = "1h"

[[licenses.entitlements]]
name = "Tier"
unit = "None"
value = "Enterprise"

[[licenses.entitlements]]
name = "Nodes"
unit = "Count"
max_count = 3

[[license_tokens]]
token = "lic-token-1"
license_arn = "{LICENSE}"
"""


@pytest.fixture
def emulator(tmp_path):
    path = tmp_path / "emulator.toml"
    path.write_text(CONFIG)
    emu = Emulator(tmp_path, "--config", str(path))
    yield emu
    emu.stop()


def lm(emulator, key=BUYER_KEY):
    return boto3.session.Session().client(
        "license-manager",
        region_name="us-east-1",
        endpoint_url=emulator.url,
        aws_access_key_id=key,
        aws_secret_access_key="secret",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def nodes(n):
    return [{"Name": "Nodes", "Unit": "Count", "Value": str(n)}]


def checkout(client, entitlements, token, kind="PROVISIONAL"):
    return client.checkout_license(
        ProductSKU=PRODUCT,
        CheckoutType=kind,
        KeyFingerprint=FINGERPRINT,
        Entitlements=entitlements,
        ClientToken=token,
    )


def test_boto3_license_manager_checkout_check_in_and_extend(emulator):
    client = lm(emulator)
    licenses = client.list_received_licenses()["Licenses"]
    assert [l["LicenseArn"] for l in licenses] == [LICENSE]
    assert licenses[0]["ReceivedMetadata"]["ReceivedStatus"] == "ACTIVE"
    license = client.get_license(LicenseArn=LICENSE)["License"]
    assert {e["Name"]: e.get("MaxCount") for e in license["Entitlements"]} == {"Tier": None, "Nodes": 3}

    tier = checkout(client, [{"Name": "Tier", "Unit": "None"}], "t-1")
    assert tier["EntitlementsAllowed"] == [{"Name": "Tier", "Unit": "None", "Value": "Enterprise"}]
    assert len(tier["SignedToken"]) >= 4096

    two = checkout(client, nodes(2), "n-1")
    assert two["CheckoutType"] == "PROVISIONAL" and two["Expiration"]
    checkout(client, nodes(1), "n-2")
    with pytest.raises(client.exceptions.NoEntitlementsAllowedException):
        checkout(client, nodes(1), "n-3")
    client.check_in_license(LicenseConsumptionToken=two["LicenseConsumptionToken"])
    checkout(client, nodes(2), "n-4")
    with pytest.raises(client.exceptions.ConflictException):
        client.check_in_license(LicenseConsumptionToken=two["LicenseConsumptionToken"])
    extended = client.extend_license_consumption(LicenseConsumptionToken=tier["LicenseConsumptionToken"])
    assert extended["LicenseConsumptionToken"] == tier["LicenseConsumptionToken"]

    held = [c for c in emulator.admin("/_emulator/license-consumptions") if not c["checked_in"]]
    assert sorted(sum(e["amount"] for e in c["entitlements"]) for c in held) == [0, 1, 2]


def test_boto3_license_manager_errors_are_typed(emulator):
    client = lm(emulator)
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.checkout_license(ProductSKU="prod-nope", CheckoutType="PROVISIONAL",
                                KeyFingerprint=FINGERPRINT, Entitlements=nodes(1), ClientToken="x")
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.extend_license_consumption(LicenseConsumptionToken="lct-nope")
    with pytest.raises(client.exceptions.NoEntitlementsAllowedException):
        checkout(client, [{"Name": "Cores", "Unit": "Count", "Value": "1"}], "c-1")
    with pytest.raises(client.exceptions.InvalidParameterValueException):
        checkout(client, [{"Name": "Nodes", "Unit": "Count", "Value": "many"}], "c-2")
    with pytest.raises(client.exceptions.InvalidParameterValueException):
        client.get_license(LicenseArn="arn:aws:license-manager::111122223333:license:l-other")
    with pytest.raises(client.exceptions.AccessDeniedException):
        client.get_access_token(Token="not-a-token")
    # Another account sees no license.
    stranger = lm(emulator, key="AKIDSTRANGER")
    assert stranger.list_received_licenses()["Licenses"] == []
    # botocore's own validation runs first: an entitlement without its Unit never leaves the client.
    with pytest.raises(ParamValidationError):
        client.checkout_license(ProductSKU=PRODUCT, CheckoutType="PROVISIONAL",
                                KeyFingerprint=FINGERPRINT, Entitlements=[{"Name": "Nodes"}], ClientToken="v")
    # A ClientToken reused for another checkout is refused; for the same one, the same answer.
    first = checkout(client, nodes(1), "same")
    assert checkout(client, nodes(1), "same")["LicenseConsumptionToken"] == first["LicenseConsumptionToken"]
    with pytest.raises(ClientError) as excinfo:
        checkout(client, nodes(2), "same")
    assert excinfo.value.response["Error"]["Code"] == "ValidationException"


def test_boto3_license_manager_access_token(emulator):
    out = lm(emulator).get_access_token(Token="lic-token-1")
    assert out["AccessToken"].count(".") == 2
