"""Clients nobody here wrote (boto3, the AWS CLI, PyJWT) against `meterd emulator`.

Each test starts the built binary on a free loopback port. Run with scripts/python-tests.sh.
"""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import jwt
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("METERD_BIN", ROOT / "target" / "debug" / "meterd"))
PRODUCT = "prod-demo1234"
KEY_ID = "AKIDPYTEST"
SECRET = "pytest-secret"


class Emulator:
    def __init__(self, tmp_path, *args):
        if not BINARY.exists():
            pytest.fail(f"{BINARY} is missing: run cargo build (scripts/python-tests.sh does)")
        self.dir = tmp_path
        self.key_file = tmp_path / "emulator-key.pem"
        addr_file = tmp_path / "addr"
        self.log = tmp_path / "emulator.log"
        self.proc = subprocess.Popen(
            [
                str(BINARY),
                "emulator",
                "--listen",
                "127.0.0.1:0",
                "--addr-file",
                str(addr_file),
                "--public-key-out",
                str(self.key_file),
                "--seed",
                "1",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
        )
        deadline = time.monotonic() + 30
        while not (addr_file.exists() and addr_file.read_text().endswith("\n")):
            if self.proc.poll() is not None:
                pytest.fail(f"emulator exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("emulator did not start within 30 s")
            time.sleep(0.05)
        self.url = addr_file.read_text().strip()
        line = self.proc.stdout.readline().strip()
        assert line == f"meterd emulator listening on {self.url}", line

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin(self, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST")
        with urllib.request.urlopen(req) as resp:
            return json.load(resp)

    def client(self, key=KEY_ID, secret=SECRET, region="us-east-1"):
        return boto3.session.Session().client(
            "meteringmarketplace",
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
        )

    def cli(self, *args, key=KEY_ID, secret=SECRET):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.dir),
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "1",
        }
        aws = Path(sys.executable).parent / "aws"
        return subprocess.run(
            [str(aws), "meteringmarketplace", *args, "--endpoint-url", self.url, "--output", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def emulator(tmp_path):
    emu = Emulator(tmp_path)
    yield emu
    emu.stop()


@pytest.fixture
def checked(tmp_path):
    """An emulator that verifies signatures for one configured key."""
    emu = Emulator(tmp_path, "--credential", f"{KEY_ID}:{SECRET}")
    yield emu
    emu.stop()


def last_hour():
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(hours=1)


def error_of(excinfo):
    err = excinfo.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def verify_token(token, key_pem, nonce):
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "PS256", "typ": "JWT"}
    claims = jwt.decode(token, key_pem, algorithms=["PS256"])
    assert claims["nonce"] == nonce
    assert claims["productCode"] == PRODUCT
    assert claims["publicKeyVersion"] == 1
    assert abs(claims["iat"] - time.time()) < 120
    # An algorithm we do not trust is refused by the verifier.
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, key_pem, algorithms=["RS256"])
    return claims


# ------------------------------------------------------------------ boto3


def test_boto3_all_four_operations(emulator):
    client = emulator.client()
    nonce = str(uuid.uuid4())
    out = client.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1, Nonce=nonce)
    assert "PublicKeyRotationTimestamp" not in out
    verify_token(out["Signature"], emulator.key_file.read_text(), nonce)

    hour = last_hour()
    first = client.meter_usage(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="requests", UsageQuantity=5)
    again = client.meter_usage(
        ProductCode=PRODUCT, Timestamp=hour + timedelta(minutes=30), UsageDimension="requests", UsageQuantity=5
    )
    assert first["MeteringRecordId"] == again["MeteringRecordId"]

    batch = client.batch_meter_usage(
        ProductCode=PRODUCT,
        UsageRecords=[
            {"Timestamp": hour, "CustomerIdentifier": "cust-demo-1", "Dimension": "requests", "Quantity": 3},
            {"Timestamp": hour, "CustomerAWSAccountId": "111122223333", "Dimension": "requests", "Quantity": 4},
            {"Timestamp": hour, "CustomerIdentifier": "cust-demo-unsubscribed", "Dimension": "requests", "Quantity": 1},
        ],
    )
    assert [r["Status"] for r in batch["Results"]] == ["Success", "DuplicateRecord", "CustomerNotSubscribed"]
    assert batch["UnprocessedRecords"] == []
    assert batch["Results"][0]["MeteringRecordId"]

    resolved = client.resolve_customer(RegistrationToken="demo-token-1")
    assert resolved["CustomerIdentifier"] == "cust-demo-1"
    assert resolved["CustomerAWSAccountId"] == "111122223333"
    assert resolved["ProductCode"] == PRODUCT

    records = emulator.admin("/_emulator/records")
    assert [(r["identity"], r["dimension"], r["quantity"]) for r in records] == [(KEY_ID, "requests", 5)]
    assert records[0]["hour"] == int(hour.timestamp())
    assert len(emulator.admin("/_emulator/batch-records")) == 1


def test_boto3_documented_errors(emulator):
    client = emulator.client()
    hour = last_hour()
    client.meter_usage(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="requests", UsageQuantity=5)
    emulator.admin("/_emulator/registration-tokens", {"token": "tok-once", "customer_identifier": "cust-demo-1"})
    client.resolve_customer(RegistrationToken="tok-once")
    old = datetime.now(timezone.utc) - timedelta(hours=7)
    # BatchMeterUsage takes records up to 24 hours old (the newest SDK models).
    batch_old = datetime.now(timezone.utc) - timedelta(hours=25)

    cases = [
        ("duplicate quantity", client.meter_usage,
         dict(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="requests", UsageQuantity=6),
         "DuplicateRequestException"),
        ("7 hours old", client.meter_usage,
         dict(ProductCode=PRODUCT, Timestamp=old, UsageDimension="gigabytes"),
         "TimestampOutOfBoundsException"),
        ("unknown product", client.meter_usage,
         dict(ProductCode="prod-nope", Timestamp=hour, UsageDimension="requests"),
         "InvalidProductCodeException"),
        ("unknown dimension", client.meter_usage,
         dict(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="seats"),
         "InvalidUsageDimensionException"),
        ("bad tag", client.meter_usage,
         dict(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="gigabytes", UsageQuantity=1,
              UsageAllocations=[{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "a?", "Value": "b"}]}]),
         "InvalidTagException"),
        ("allocations not summing", client.meter_usage,
         dict(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="gigabytes", UsageQuantity=2,
              UsageAllocations=[{"AllocatedUsageQuantity": 1}]),
         "InvalidUsageAllocationsException"),
        ("dry run", client.meter_usage,
         dict(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="gigabytes", DryRun=True),
         "DryRunOperation"),
        ("unknown key version", client.register_usage,
         dict(ProductCode=PRODUCT, PublicKeyVersion=9), "InvalidPublicKeyVersionException"),
        ("reused token", client.resolve_customer, dict(RegistrationToken="tok-once"), "ExpiredTokenException"),
        ("unknown token", client.resolve_customer, dict(RegistrationToken="tok-nobody"), "InvalidTokenException"),
        ("both customer members", client.batch_meter_usage,
         dict(ProductCode=PRODUCT, UsageRecords=[{"Timestamp": hour, "CustomerIdentifier": "cust-demo-1",
                                                  "CustomerAWSAccountId": "111122223333", "Dimension": "requests"}]),
         "InvalidCustomerIdentifierException"),
        ("one old record", client.batch_meter_usage,
         dict(ProductCode=PRODUCT, UsageRecords=[
             {"Timestamp": hour, "CustomerIdentifier": "cust-demo-1", "Dimension": "gigabytes"},
             {"Timestamp": batch_old, "CustomerIdentifier": "cust-demo-1", "Dimension": "requests"}]),
         "TimestampOutOfBoundsException"),
    ]
    for name, call, params, want in cases:
        with pytest.raises(ClientError) as excinfo:
            call(**params)
        assert error_of(excinfo) == (want, 400), name
        modeled = getattr(client.exceptions, want, None)
        if modeled is not None:
            assert isinstance(excinfo.value, modeled), name

    west = emulator.client(region="us-west-2")
    with pytest.raises(ClientError) as excinfo:
        west.meter_usage(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="gigabytes")
    assert error_of(excinfo) == ("InvalidEndpointRegionException", 400)
    with pytest.raises(west.exceptions.InvalidRegionException):
        west.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)

    # Nothing rejected was stored.
    assert len(emulator.admin("/_emulator/records")) == 1
    assert emulator.admin("/_emulator/batch-records") == []


def test_boto3_entitlement_and_faults(emulator):
    emulator.admin("/_emulator/entitlement", {"product_code": PRODUCT, "entitlement": "platform_not_supported"})
    task = emulator.client(key="AKIDNEWTASK")
    with pytest.raises(task.exceptions.PlatformNotSupportedException):
        task.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)
    task.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)  # only the first call fails

    emulator.admin("/_emulator/faults", {"operations": {"MeterUsage": {"throttle_rate": 1.0}}})
    with pytest.raises(task.exceptions.ThrottlingException):
        task.meter_usage(ProductCode=PRODUCT, Timestamp=last_hour(), UsageDimension="requests")
    emulator.admin("/_emulator/faults", {"operations": {"MeterUsage": {"error_rate": 1.0}}})
    with pytest.raises(ClientError) as excinfo:
        task.meter_usage(ProductCode=PRODUCT, Timestamp=last_hour(), UsageDimension="requests")
    assert error_of(excinfo) == ("InternalServiceErrorException", 500)
    assert emulator.admin("/_emulator/records") == []
    faults = [c["fault"] for c in emulator.admin("/_emulator/calls")]
    assert faults[-2:] == ["throttled", "server_error"]


def test_boto3_signatures_are_verified(checked):
    checked.client().register_usage(ProductCode=PRODUCT, PublicKeyVersion=1, Nonce="n")
    with pytest.raises(ClientError) as excinfo:
        checked.client(secret="wrong-secret").register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)
    assert error_of(excinfo) == ("InvalidSignatureException", 400)
    assert "does not match the signature you provided" in str(excinfo.value)
    with pytest.raises(ClientError) as excinfo:
        checked.client(key="AKIDSTRANGER").meter_usage(
            ProductCode=PRODUCT, Timestamp=last_hour(), UsageDimension="requests"
        )
    assert error_of(excinfo) == ("UnrecognizedClientException", 400)
    assert checked.admin("/_emulator/records") == []


# ------------------------------------------------------------------ AWS CLI


def cli_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_aws_cli_all_four_operations(emulator):
    nonce = str(uuid.uuid4())
    out = cli_json(emulator.cli("register-usage", "--product-code", PRODUCT, "--public-key-version", "1", "--nonce", nonce))
    verify_token(out["Signature"], emulator.key_file.read_text(), nonce)

    hour = last_hour().strftime("%Y-%m-%dT%H:%M:%SZ")
    out = cli_json(emulator.cli(
        "meter-usage", "--product-code", PRODUCT, "--timestamp", hour, "--usage-dimension", "gigabytes",
        "--usage-quantity", "12",
        "--usage-allocations", json.dumps([
            {"AllocatedUsageQuantity": 10, "Tags": [{"Key": "team", "Value": "a"}]},
            {"AllocatedUsageQuantity": 2},
        ]),
    ))
    assert re.fullmatch(r"[0-9a-f-]{36}", out["MeteringRecordId"])

    records = json.dumps([{"Timestamp": hour, "CustomerAWSAccountId": "111122223333", "Dimension": "requests", "Quantity": 1}])
    out = cli_json(emulator.cli("batch-meter-usage", "--product-code", PRODUCT, "--usage-records", records))
    assert [r["Status"] for r in out["Results"]] == ["Success"]

    out = cli_json(emulator.cli("resolve-customer", "--registration-token", "demo-token-2"))
    assert (out["CustomerIdentifier"], out["CustomerAWSAccountId"], out["ProductCode"]) == (
        "cust-demo-1", "111122223333", PRODUCT)

    stored = emulator.admin("/_emulator/records")
    assert [(r["dimension"], r["quantity"], len(r["allocations"])) for r in stored] == [("gigabytes", 12, 2)]


def test_aws_cli_errors(emulator):
    hour = last_hour().strftime("%Y-%m-%dT%H:%M:%SZ")
    meter = ("meter-usage", "--product-code", PRODUCT, "--timestamp", hour, "--usage-dimension", "requests")
    cli_json(emulator.cli(*meter, "--usage-quantity", "1"))
    cases = [
        ("duplicate", (*meter, "--usage-quantity", "2"), "DuplicateRequestException"),
        ("unknown key version", ("register-usage", "--product-code", PRODUCT, "--public-key-version", "4"),
         "InvalidPublicKeyVersionException"),
        ("unknown token", ("resolve-customer", "--registration-token", "nope"), "InvalidTokenException"),
        ("dry run", (*meter, "--dry-run"), "DryRunOperation"),
    ]
    for name, args, want in cases:
        result = emulator.cli(*args)
        assert result.returncode != 0, name
        assert f"({want})" in result.stderr, (name, result.stderr)


def test_aws_cli_signatures_are_verified(checked):
    ok = checked.cli("register-usage", "--product-code", PRODUCT, "--public-key-version", "1")
    assert ok.returncode == 0, ok.stderr
    bad = checked.cli("register-usage", "--product-code", PRODUCT, "--public-key-version", "1", secret="wrong")
    assert bad.returncode != 0
    assert "(InvalidSignatureException)" in bad.stderr, bad.stderr


# ------------------------------------------------------------------ docs


def docs_example():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Testing your own integration against the emulator", 1)[1]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match, "README.md has no python example in its emulator section"
    return match.group(1)


def test_readme_boto3_example_works_as_written(emulator):
    env = dict(os.environ, METERD_EMULATOR_URL=emulator.url, AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    result = subprocess.run([sys.executable, "-c", docs_example()], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "metering record" in result.stdout
    assert "second report for the hour refused" in result.stdout
    records = emulator.admin("/_emulator/records")
    assert [(r["identity"], r["quantity"]) for r in records] == [("AKIDEXAMPLETASK1", 42)]
