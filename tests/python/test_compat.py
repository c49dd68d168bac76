"""Client compatibility: one sequence of calls, run by every client against a fresh `meterd emulator`.

Clients: boto3 in the legacy, standard and adaptive retry modes, the AWS CLI (v1) and the AWS SDK
for JavaScript v3 (tests/js, `npm ci` by scripts/python-tests.sh); the AWS SDKs for Go v1 and v2
from Debian (tests/go, GOPATH mode, offline) for the four operations and a typed exception. Each modeled exception must
surface as the client's typed class (boto3: `client.exceptions.X`; JS: the package's `X` class;
the CLI prints the code). Also: credentials from the emulator's STS (IRSA) and container endpoint,
ClientToken reuse, and a clock-shifted emulator.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from test_clients import PRODUCT, ROOT, Emulator

JS_DIR = ROOT / "tests" / "js"
NODE = shutil.which("node")
ROLE_ARN = "arn:aws:iam::123456789012:role/meterd"
NOT_ENTITLED = "prod-notentitled"

# Every error the Metering Service model declares (botocore's meteringmarketplace model, the
# version pinned in requirements.txt). DryRunOperation is an error code but not modeled.
MODELED = sorted(
    {
        err.name
        for op in botocore.session.get_session().get_service_model("meteringmarketplace").operation_names
        for err in botocore.session.get_session().get_service_model("meteringmarketplace").operation_model(op).error_shapes
    }
)

CONFIG = """
[[products]]
code = "prod-demo1234"
dimensions = ["requests", "gigabytes"]

[[products]]
code = "prod-notentitled"
dimensions = ["requests"]
entitlement = "not_entitled"

[[products]]
code = "prod-noplatform"
dimensions = ["requests"]
entitlement = "platform_not_supported"

[[customers]]
identifier = "cust-demo-1"
aws_account_id = "111122223333"
product_code = "prod-demo1234"

[[registration_tokens]]
token = "tok-once"
customer_identifier = "cust-demo-1"

# The sequences run faster than the per-account quotas (10 MeterUsage a second): counted, not
# throttled, so every ThrottlingException here is the injected fault.
[quotas]
enabled = false

[temporary_credentials]
[[temporary_credentials.tasks]]
id = "task-1"
role_arn = "arn:aws:iam::123456789012:role/meterd"
authorization_token = "task-1-token"
"""


def start(tmp_path, extra="", *args):
    """`extra`: top-level keys, written before CONFIG's tables."""
    path = tmp_path / "emulator.toml"
    path.write_text(extra + CONFIG)
    return Emulator(tmp_path, "--config", str(path), *args)


@pytest.fixture
def emulator(tmp_path):
    emu = start(tmp_path)
    yield emu
    emu.stop()


def hour_start(hours_ago=1):
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return int((now - timedelta(hours=hours_ago)).timestamp())


def main_sequence():
    """(name, operation, input, expected): expected is "ok" or the error code. In order."""
    hour, old = hour_start(), hour_start(7)
    meter = dict(ProductCode=PRODUCT, Timestamp=hour, UsageDimension="requests")
    record = dict(Timestamp=hour, CustomerIdentifier="cust-demo-1", Dimension="requests", Quantity=1)
    return [
        ("register", "RegisterUsage", dict(ProductCode=PRODUCT, PublicKeyVersion=1, Nonce="n-1"), "ok"),
        ("meter", "MeterUsage", dict(meter, UsageQuantity=5), "ok"),
        ("batch", "BatchMeterUsage", dict(ProductCode=PRODUCT, UsageRecords=[record]), "ok"),
        ("resolve", "ResolveCustomer", dict(RegistrationToken="tok-once"), "ok"),
        ("dry run", "MeterUsage", dict(meter, UsageDimension="gigabytes", DryRun=True), "DryRunOperation"),
        ("duplicate", "MeterUsage", dict(meter, UsageQuantity=6), "DuplicateRequestException"),
        ("token reused", "ResolveCustomer", dict(RegistrationToken="tok-once"), "ExpiredTokenException"),
        ("unknown token", "ResolveCustomer", dict(RegistrationToken="tok-nobody"), "InvalidTokenException"),
        ("7 hours old", "MeterUsage", dict(meter, Timestamp=old), "TimestampOutOfBoundsException"),
        ("unknown product", "MeterUsage", dict(meter, ProductCode="prod-nope"), "InvalidProductCodeException"),
        ("unknown dimension", "MeterUsage", dict(meter, UsageDimension="seats"), "InvalidUsageDimensionException"),
        ("bad tag", "MeterUsage",
         dict(meter, UsageDimension="gigabytes", UsageQuantity=1,
              UsageAllocations=[{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "a?", "Value": "b"}]}]),
         "InvalidTagException"),
        ("allocations not summing", "MeterUsage",
         dict(meter, UsageDimension="gigabytes", UsageQuantity=2, UsageAllocations=[{"AllocatedUsageQuantity": 1}]),
         "InvalidUsageAllocationsException"),
        ("unknown key version", "RegisterUsage", dict(ProductCode=PRODUCT, PublicKeyVersion=9),
         "InvalidPublicKeyVersionException"),
        ("both customer members", "BatchMeterUsage",
         dict(ProductCode=PRODUCT, UsageRecords=[dict(record, CustomerAWSAccountId="111122223333")]),
         "InvalidCustomerIdentifierException"),
        ("platform", "RegisterUsage", dict(ProductCode="prod-noplatform", PublicKeyVersion=1),
         "PlatformNotSupportedException"),
        ("not entitled", "MeterUsage", dict(meter, ProductCode=NOT_ENTITLED), "CustomerNotEntitledException"),
        ("token, other request", "MeterUsage",
         dict(meter, UsageDimension="gigabytes", UsageQuantity=1, ClientToken="ct-conflict"), "ok"),
        ("token, changed quantity", "MeterUsage",
         dict(meter, UsageDimension="gigabytes", UsageQuantity=2, ClientToken="ct-conflict"),
         "IdempotencyConflictException"),
    ]


# #15 item 1 (LicenseArn rules): a batch without ProductCode naming a license the emulator does
# not know.
LICENSE_SEQUENCE = [
    ("unknown license", "BatchMeterUsage",
     dict(UsageRecords=[dict(Timestamp=hour_start(), CustomerAWSAccountId="111122223333", Dimension="requests",
                             Quantity=1, LicenseArn="arn:aws:license-manager::111122223333:license:l-unknown")]),
     "InvalidLicenseException"),
]


WEST_SEQUENCE = [
    ("other region meter", "MeterUsage",
     dict(ProductCode=PRODUCT, Timestamp=hour_start(), UsageDimension="requests"), "InvalidEndpointRegionException"),
    ("other region register", "RegisterUsage", dict(ProductCode=PRODUCT, PublicKeyVersion=1), "InvalidRegionException"),
]
# After FAULTS is set: ResolveCustomer throttled, RegisterUsage failing, BatchMeterUsage
# disabled through a second emulator (DISABLED).
FAULTS = {"operations": {"ResolveCustomer": {"throttle_rate": 1.0}, "RegisterUsage": {"error_rate": 1.0}}}
FAULT_SEQUENCE = [
    ("throttled", "ResolveCustomer", dict(RegistrationToken="tok-nobody"), "ThrottlingException"),
    ("server error", "RegisterUsage", dict(ProductCode=PRODUCT, PublicKeyVersion=1), "InternalServiceErrorException"),
]
DISABLED = 'disabled_operations = ["BatchMeterUsage", "RegisterUsage", "ResolveCustomer"]\n'
DISABLED_SEQUENCE = [
    ("disabled", "ResolveCustomer", dict(RegistrationToken="tok-once"), "DisabledApiException"),
]


def covered_codes():
    seqs = main_sequence() + WEST_SEQUENCE + FAULT_SEQUENCE + DISABLED_SEQUENCE + LICENSE_SEQUENCE
    return {want for *_, want in seqs}


def test_the_sequences_cover_every_modeled_exception():
    assert set(MODELED) <= covered_codes(), sorted(set(MODELED) - covered_codes())
    assert len(MODELED) >= 19, MODELED


# ------------------------------------------------------------------ drivers
# Each runs a sequence and returns [(name, outcome)] where outcome is "ok", or the code with a
# "!untyped" suffix when a modeled error did not arrive as the client's typed class.


def snake(op):
    return "".join("_" + c.lower() if c.isupper() else c for c in op).lstrip("_")


def boto3_client(emu, mode, region="us-east-1", attempts=1, **creds):
    session = boto3.session.Session(**creds) if creds else boto3.session.Session(
        aws_access_key_id="AKIDCOMPAT", aws_secret_access_key="secret")
    return session.client(
        "meteringmarketplace", region_name=region, endpoint_url=emu.url,
        config=Config(retries={"total_max_attempts": attempts, "mode": mode}),
    )


def run_boto3(client, sequence):
    out = []
    for name, op, params, _ in sequence:
        params = {k: (datetime.fromtimestamp(v, timezone.utc) if k == "Timestamp" else v) for k, v in params.items()}
        try:
            getattr(client, snake(op))(**params)
            out.append((name, "ok"))
        except ClientError as e:
            code = e.response["Error"]["Code"]
            typed = getattr(client.exceptions, code, None)
            untyped = code in MODELED and not (typed and isinstance(e, typed))
            out.append((name, code + ("!untyped" if untyped else "")))
    return out


def cli_env(emu, region="us-east-1", **extra):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(emu.dir),
        "AWS_ACCESS_KEY_ID": "AKIDCOMPAT",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": region,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
    }
    env.update(extra)
    return env


def run_cli(emu, sequence, region="us-east-1"):
    aws = Path(sys.executable).parent / "aws"
    out = []
    for name, op, params, _ in sequence:
        kebab = snake(op).replace("_", "-")
        result = subprocess.run(
            [str(aws), "meteringmarketplace", kebab, "--cli-input-json", json.dumps(params),
             "--endpoint-url", emu.url, "--output", "json"],
            env=cli_env(emu, region), capture_output=True, text=True, timeout=60,
        )
        if result.returncode == 0:
            out.append((name, "ok"))
        else:
            start = result.stderr.find("An error occurred (")
            assert start >= 0, (name, result.stderr)
            out.append((name, result.stderr[start + len("An error occurred ("):].split(")")[0]))
    return out


def run_js(emu, sequence, region="us-east-1", attempts=1, env=None):
    """`env`: the credential chain's variables; without it, a static key."""
    if NODE is None or not (JS_DIR / "node_modules").is_dir():
        pytest.fail("node and tests/js/node_modules are needed (scripts/python-tests.sh runs npm ci)")
    spec = {
        "endpoint": emu.url, "region": region, "maxAttempts": attempts,
        "cases": [{"name": n, "op": op, "input": params} for n, op, params, _ in sequence],
    }
    if env is None:
        spec.update(key="AKIDCOMPAT", secret="secret")
    path = emu.dir / f"js-{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(spec))
    result = subprocess.run([NODE, str(JS_DIR / "compat.mjs"), str(path)], capture_output=True, text=True,
                            timeout=120, cwd=JS_DIR,
                            env={"PATH": os.environ.get("PATH", ""), "HOME": str(emu.dir), **(env or {})})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    out = []
    for r in report["results"]:
        if r["ok"]:
            out.append((r["name"], "ok"))
        else:
            untyped = r["code"] in MODELED and not r["typed"]
            out.append((r["name"], r["code"] + ("!untyped" if untyped else "")))
    return out, report


CLIENTS = ["boto3-legacy", "boto3-standard", "boto3-adaptive", "aws-cli", "js-v3"]


def run(client, emu, sequence, region="us-east-1"):
    if client.startswith("boto3-"):
        return run_boto3(boto3_client(emu, client.split("-", 1)[1], region), sequence)
    if client == "aws-cli":
        return run_cli(emu, sequence, region)
    return run_js(emu, sequence, region)[0]


def expected(sequence):
    return [(name, want) for name, _, _, want in sequence]


@pytest.mark.parametrize("client", CLIENTS)
def test_every_operation_and_modeled_exception(client, tmp_path):
    emu = start(tmp_path)
    disabled_dir = tmp_path / "disabled"
    disabled_dir.mkdir()
    disabled = start(disabled_dir, DISABLED)
    try:
        got = run(client, emu, main_sequence())
        got += run(client, emu, WEST_SEQUENCE, region="us-west-2")
        emu.admin("/_emulator/faults", FAULTS)
        got += run(client, emu, FAULT_SEQUENCE)
        got += run(client, disabled, DISABLED_SEQUENCE)
        want = expected(main_sequence() + WEST_SEQUENCE + FAULT_SEQUENCE + DISABLED_SEQUENCE)
        assert got == want
        stored = emu.admin("/_emulator/records")
        assert [(r["dimension"], r["quantity"]) for r in stored] == [("requests", 5), ("gigabytes", 1)]
    finally:
        emu.stop()
        disabled.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_an_unknown_license_is_the_typed_invalid_license_exception(client, emulator):
    assert run(client, emulator, LICENSE_SEQUENCE) == expected(LICENSE_SEQUENCE)


# ------------------------------------------------------------------ ClientToken reuse
# #15 item 2 (ClientToken reuse compares meaning): without it the three "written differently"
# calls answer IdempotencyConflictException.


def token_sequence():
    h1, h2, h3 = hour_start(1), hour_start(2), hour_start(3)
    base = dict(ProductCode=PRODUCT, UsageDimension="gigabytes")
    allocs = [
        {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}]},
        {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "c", "Value": "3"}]},
    ]
    reordered = [
        {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "c", "Value": "3"}]},
        {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "b", "Value": "2"}, {"Key": "a", "Value": "1"}]},
    ]
    return [
        ("order", "MeterUsage", dict(base, Timestamp=h1, UsageQuantity=3, UsageAllocations=allocs, ClientToken="ct-1"), "ok"),
        ("order again", "MeterUsage",
         dict(base, Timestamp=h1, UsageQuantity=3, UsageAllocations=reordered, ClientToken="ct-1"), "ok"),
        ("zero", "MeterUsage", dict(base, Timestamp=h2, ClientToken="ct-2"), "ok"),
        ("zero again", "MeterUsage", dict(base, Timestamp=h2, UsageQuantity=0, ClientToken="ct-2"), "ok"),
        ("dry run", "MeterUsage", dict(base, Timestamp=h3, UsageQuantity=1, ClientToken="ct-3"), "ok"),
        ("dry run again", "MeterUsage", dict(base, Timestamp=h3, UsageQuantity=1, DryRun=False, ClientToken="ct-3"), "ok"),
        ("different request", "MeterUsage",
         dict(base, Timestamp=h1, UsageQuantity=4, UsageAllocations=allocs[:1] + [dict(allocs[1], AllocatedUsageQuantity=2)],
              ClientToken="ct-1"),
         "IdempotencyConflictException"),
    ]


@pytest.mark.parametrize("client", CLIENTS)
def test_client_token_reuse_returns_the_first_record(client, emulator):
    got = run(client, emulator, token_sequence())
    assert got == expected(token_sequence())
    stored = emulator.admin("/_emulator/records")
    assert len(stored) == 3, stored
    assert len({r["metering_record_id"] for r in stored}) == 3


# ------------------------------------------------------------------ clock shift
# #15 item 3 (the response Date is the emulator's clock): without it the JS SDK's retry fails too.


def test_js_sdk_corrects_its_clock_from_a_shifted_emulator(tmp_path):
    shifted = datetime.now(timezone.utc) - timedelta(days=3)
    emu = start(tmp_path, 'signature_max_skew = "15m"\n', "--start-time", shifted.strftime("%Y-%m-%dT%H:%M:%SZ"))
    try:
        # The first attempt is signed with the wall clock and refused; the SDK takes the
        # offset from the response's Date and its retry is signed on the emulator's time.
        seq = [("register", "RegisterUsage", dict(ProductCode=PRODUCT, PublicKeyVersion=1), "ok")]
        got, report = run_js(emu, seq, attempts=3)
        assert got == expected(seq), report
        assert abs(report["offset"] / 1000 + 3 * 86400) < 600, report
        # boto3 has no skew correction (botocore reads Date only for its retry TTL): refused.
        with pytest.raises(ClientError) as e:
            boto3_client(emu, "standard", attempts=3).register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)
        assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
        assert "Signature expired" in str(e.value)
    finally:
        emu.stop()


# ------------------------------------------------------------------ retry modes


@pytest.mark.parametrize("mode", ["legacy", "standard", "adaptive"])
def test_boto3_retry_modes_retry_throttling_and_server_errors(mode, emulator):
    emulator.admin("/_emulator/faults", FAULTS)
    client = boto3_client(emulator, mode, attempts=3)
    with pytest.raises(client.exceptions.ThrottlingException):
        client.resolve_customer(RegistrationToken="tok-once")
    with pytest.raises(client.exceptions.InternalServiceErrorException):
        client.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)
    ops = [c["operation"] for c in emulator.admin("/_emulator/calls")]
    assert ops == ["ResolveCustomer"] * 3 + ["RegisterUsage"] * 3, ops


# ------------------------------------------------------------------ credential flows


def web_identity_token(pod_uid):
    b64 = lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).rstrip(b"=").decode()
    claims = {"sub": "system:serviceaccount:billing:app", "aud": ["sts.amazonaws.com"],
              "kubernetes.io": {"pod": {"name": "app-0", "uid": pod_uid}}}
    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2ln"


def flow_env(emu, flow):
    env = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}
    if flow == "irsa":
        token = emu.dir / "token"
        token.write_text(web_identity_token("pod-uid-1"))
        env.update(AWS_WEB_IDENTITY_TOKEN_FILE=str(token), AWS_ROLE_ARN=ROLE_ARN,
                   AWS_ENDPOINT_URL_STS=emu.url)
    else:
        env.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{emu.url}/v2/credentials/task-1",
                   AWS_CONTAINER_AUTHORIZATION_TOKEN="task-1-token")
    return env


IDENTITY = {"irsa": "123456789012:assumed-role/meterd/pod-uid-1", "ecs": "123456789012:assumed-role/meterd/task-1"}


@pytest.mark.parametrize("flow", ["irsa", "ecs"])
def test_the_js_sdk_uses_the_emulators_credential_flows(flow, tmp_path):
    emu = start(tmp_path, "", "--credential", "AKIDNOBODY:x")
    try:
        seq = [("meter", "MeterUsage", dict(ProductCode=PRODUCT, Timestamp=hour_start(), UsageDimension="requests",
                                             UsageQuantity=2), "ok")]
        got, report = run_js(emu, seq, env=flow_env(emu, flow))
        assert got == expected(seq), report
        stored = emu.admin("/_emulator/records")
        assert [(r["identity"], r["quantity"]) for r in stored] == [(IDENTITY[flow], 2)]
        assert all(c["identity"].startswith("ASIA") for c in emu.admin("/_emulator/calls"))
    finally:
        emu.stop()


@pytest.mark.parametrize("flow", ["irsa", "ecs"])
def test_boto3_and_the_cli_use_the_emulators_credential_flows(flow, tmp_path, monkeypatch):
    # Only issued credentials pass: a long-term key is configured and nobody uses it.
    emu = start(tmp_path, "", "--credential", "AKIDNOBODY:x")
    try:
        env = flow_env(emu, flow)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        session = boto3.session.Session()
        who = session.client("sts", region_name="us-east-1", endpoint_url=emu.url).get_caller_identity()
        assert who["Arn"].startswith("arn:aws:sts::123456789012:assumed-role/meterd/"), who
        client = session.client("meteringmarketplace", region_name="us-east-1", endpoint_url=emu.url)
        client.meter_usage(ProductCode=PRODUCT, Timestamp=datetime.fromtimestamp(hour_start(), timezone.utc),
                           UsageDimension="requests", UsageQuantity=2)
        aws = Path(sys.executable).parent / "aws"
        cli = subprocess.run(
            [str(aws), "meteringmarketplace", "meter-usage", "--product-code", PRODUCT,
             "--timestamp", str(hour_start()), "--usage-dimension", "requests", "--usage-quantity", "2",
             "--endpoint-url", emu.url, "--output", "json"],
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(emu.dir), "AWS_MAX_ATTEMPTS": "1", **env},
            capture_output=True, text=True, timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        # Two processes, two sets of keys, one instance: the CLI's identical report is the same record.
        stored = emu.admin("/_emulator/records")
        assert [(r["identity"], r["quantity"]) for r in stored] == [(IDENTITY[flow], 2)]
        assert json.loads(cli.stdout)["MeteringRecordId"] == stored[0]["metering_record_id"]
        keys = {c["identity"] for c in emu.admin("/_emulator/calls")}
        assert len(keys) == 2 and all(k.startswith("ASIA") for k in keys), keys
    finally:
        emu.stop()


# ------------------------------------------------------------------ Go SDKs (Debian, GOPATH mode)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_go_sdk_from_debian(version, tmp_path):
    go = shutil.which("go")
    if go is None:
        pytest.fail("go is missing: scripts/python-tests.sh installs golang-go and the Debian AWS SDKs")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "GOPATH": "/usr/share/gocode",
           "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "", "GOCACHE": str(ROOT / "target" / "go-cache")}
    binary = tmp_path / f"go-{version}"
    built = subprocess.run([go, "build", "-o", str(binary), f"./{version}"], cwd=ROOT / "tests" / "go", env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    emu = Emulator(tmp_path)  # the demo configuration: cust-demo-1, demo-token-1
    try:
        ran = subprocess.run([str(binary)], env=dict(env, METERD_EMULATOR_URL=emu.url), capture_output=True,
                             text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        stored = emu.admin("/_emulator/records")
        assert [(r["dimension"], r["quantity"], r["metering_record_id"]) for r in stored] == [
            ("requests", 5, ran.stdout.strip())]
        assert len(emu.admin("/_emulator/batch-records")) == 1
    finally:
        emu.stop()
