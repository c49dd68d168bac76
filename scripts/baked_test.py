#!/usr/bin/env python3
"""A locked-down (baked) build refuses every entitlement bypass; an unbaked one still allows it.

Builds meterd with METERD_PRODUCT_CODE, METERD_PRICING=hourly+custom, METERD_PLATFORM=container
and METERD_ENDPOINT_URL (the emulator started here, so no call leaves loopback) into
target/baked, then runs each bypass against both binaries:

  pricing     pricing = "custom" skips RegisterUsage            baked: exit 78 (METERD_PRICING)
  keys        registration.public_key_files adds a signing key  baked: exit 78 (public_key_files)
  imds        platform = "auto" and a fake IMDS on loopback     baked: IMDS never asked, RegisterUsage made
  endpoint    aws.endpoint_url to another service               baked: exit 78 (not an AWS endpoint)
  env         AWS_ENDPOINT_URL to another service               baked: ignored, the baked endpoint is called
  platform    platform = "ec2"                                  baked: exit 78 (METERD_PLATFORM)

The emulator signs with its own key, not keys/v1.pem, so a baked build that reaches
RegisterUsage fails verification (exit 65): that is how the test sees it took the container
path with only the baked keyring.

    scripts/baked_test.py [unbaked meterd]      # default target/debug/meterd
"""

import http.server
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNBAKED = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/debug/meterd").resolve()
BAKED_DIR = ROOT / "target/baked"
PRODUCT = "prod-demo1234"

failures = []


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        failures.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class FakeImds(http.server.BaseHTTPRequestHandler):
    """Answers IMDSv2 like an EC2 instance would, and counts every request."""

    hits = 0

    def do_PUT(self):
        FakeImds.hits += 1
        self._answer(200, b"token")

    def do_GET(self):
        FakeImds.hits += 1
        self._answer(200, b"i-0fake000000000000")

    def _answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def seed_baked_target():
    """target/baked reuses target/debug's compiled dependencies, so only meterd compiles."""
    for part in ("deps", "build", ".fingerprint"):
        src, dst = ROOT / "target/debug" / part, BAKED_DIR / "debug" / part
        if src.exists() and not dst.exists():
            shutil.copytree(src, dst, symlinks=True)


def build_baked(endpoint):
    env = dict(os.environ, CARGO_TARGET_DIR=str(BAKED_DIR), METERD_PRODUCT_CODE=PRODUCT,
               METERD_PRICING="hourly+custom", METERD_PLATFORM="container",
               METERD_ENDPOINT_URL=endpoint)
    subprocess.run(["cargo", "build", "--locked", "--quiet", "--bin", "meterd"], cwd=ROOT,
                   env=env, check=True)
    return BAKED_DIR / "debug/meterd"


def calls(emulator, access_key):
    with urllib.request.urlopen(f"{emulator}/_emulator/calls", timeout=5) as r:
        return [c["operation"] for c in json.load(r) if c.get("identity") == access_key]


def config(tmp, name, pricing="hourly+custom", platform="ecs", keys=None, endpoint=None):
    """An agent configuration for the demo product on a free port; returns (path, port)."""
    port = free_port()
    lines = [
        f'product_code = "{PRODUCT}"',
        f'pricing = "{pricing}"',
        f'platform = "{platform}"',
        "[metering]", 'dimensions = ["requests"]',
        "[registration]", 'startup_budget = "2s"',
        *([f'public_key_files = ["{keys}"]'] if keys else []),
        "[server]", f'listen = "127.0.0.1:{port}"',
        "[state]", f'dir = "{tmp / name / "state"}"',
        "[aws]", 'region = "us-east-1"',
        *([f'endpoint_url = "{endpoint}"'] if endpoint else []),
    ]
    path = tmp / name / "meterd.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path, port


def run(binary, cfg, port, access_key, extra_env=None, until_ready=False):
    """Runs the agent; returns (exit code or 'ready', stderr). 'ready' means /readyz said 200."""
    env = {"PATH": os.environ.get("PATH", ""), "TZ": "UTC", "AWS_ACCESS_KEY_ID": access_key,
           "AWS_SECRET_ACCESS_KEY": "secret", "AWS_EC2_METADATA_DISABLED": "true",
           "METERD_LOG": "warn", **(extra_env or {})}
    p = subprocess.Popen([str(binary), "run", "--config", str(cfg)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    result = None
    while time.monotonic() < deadline:
        if p.poll() is not None:
            result = p.returncode
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    result = "ready"
                    break
        except Exception:
            pass
        time.sleep(0.1)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return result, p.stderr.read()


def check_config(binary, cfg):
    out = subprocess.run([str(binary), "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    return out.returncode, out.stderr


def main():
    if not UNBAKED.exists():
        print(f"baked_test: {UNBAKED} missing (cargo build first)", file=sys.stderr)
        return 1
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="meterd-baked-"))
    procs = []
    try:
        emu = subprocess.Popen(
            [str(UNBAKED), "emulator", "--listen", "127.0.0.1:0", "--addr-file", str(tmp / "emu.url"),
             "--public-key-out", str(tmp / "emulator.pem")],
            stdout=open(tmp / "emulator.log", "w"), stderr=subprocess.STDOUT)
        procs.append(emu)
        wait_for(lambda: (tmp / "emu.url").exists() and (tmp / "emu.url").read_text().strip()
                 and (tmp / "emulator.pem").exists(), 20, "the emulator")
        emulator = (tmp / "emu.url").read_text().strip()
        decoy = f"http://127.0.0.1:{free_port()}"
        seed_baked_target()
        # A build that bakes the product code must bake the pricing and the platform too.
        half = subprocess.run(["cargo", "build", "--locked", "--quiet", "--bin", "meterd"], cwd=ROOT,
                              env=dict(os.environ, CARGO_TARGET_DIR=str(BAKED_DIR),
                                       METERD_PRODUCT_CODE=PRODUCT, METERD_PRICING="",
                                       METERD_PLATFORM=""),
                              capture_output=True, text=True)
        check(half.returncode != 0 and "also set METERD_PRICING" in half.stderr,
              "a build with only METERD_PRODUCT_CODE fails, naming METERD_PRICING and METERD_PLATFORM")
        baked = build_baked(emulator)
        imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
        threading.Thread(target=imds.serve_forever, daemon=True).start()
        imds_url = f"http://127.0.0.1:{imds.server_address[1]}"
        key = tmp / "emulator.pem"

        # `meterd keys` tells a seller checking an image which build it holds.
        for binary, want in ((baked, f"build: locked: product {PRODUCT}, pricing hourly+custom, "
                                     f"platform container, keys/ only, endpoint {emulator}"),
                             (UNBAKED, "build: unlocked")):
            out = subprocess.run([str(binary), "keys"], capture_output=True, text=True, cwd=tmp)
            check(out.returncode == 0 and want in out.stdout, f"{binary} keys says {want!r}")

        # The baseline: the baked build with its own configuration reaches RegisterUsage at the
        # baked endpoint and verifies against keys/ only (the emulator's token fails: 65).
        cfg, port = config(tmp, "baseline")
        code, err = run(baked, cfg, port, "AKIABAKEDBASE0000001")
        check(code == 65, f"baseline: baked build verifies with the baked keyring only (exit {code})")
        check(calls(emulator, "AKIABAKEDBASE0000001") == ["RegisterUsage"],
              "baseline: RegisterUsage sent to the baked endpoint")

        cases = [
            ("pricing", dict(pricing="custom"), "METERD_PRICING"),
            ("keys", dict(keys=key), "public_key_files"),
            ("endpoint", dict(endpoint=decoy), "not an AWS endpoint"),
            ("platform", dict(platform="ec2", pricing="hourly+custom"), "METERD_PLATFORM"),
        ]
        for i, (name, settings, named) in enumerate(cases):
            cfg, port = config(tmp, f"baked-{name}", **settings)
            code, err = run(baked, cfg, port, f"AKIABAKEDCASE000000{i}")
            check(code == 78 and named in err,
                  f"{name}: baked build exits 78 naming {named} (exit {code}: {err.strip()[-300:]})")
            ccode, cerr = check_config(baked, cfg)
            check(ccode == 78 and named in cerr, f"{name}: baked check-config exits 78 (exit {ccode})")

        # The same bypasses still work in an unbaked build (development, demo, tests).
        for i, (name, settings) in enumerate([("pricing", dict(pricing="custom")),
                                              ("keys", dict(keys=key))]):
            cfg, port = config(tmp, f"unbaked-{name}", endpoint=emulator, **settings)
            code, err = run(UNBAKED, cfg, port, f"AKIAUNBAKEDCASE0000{i}")
            check(code == "ready", f"{name}: the unbaked build still runs ({code}: {err.strip()[-300:]})")

        # A fake IMDS: the unbaked build decides it is on EC2 and is ready without RegisterUsage;
        # the baked container build never asks IMDS and registers.
        imds_env = {"AWS_EC2_METADATA_DISABLED": "false", "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_url}
        FakeImds.hits = 0
        cfg, port = config(tmp, "unbaked-imds", platform="auto", keys=key, endpoint=emulator)
        code, _ = run(UNBAKED, cfg, port, "AKIAUNBAKEDIMDS00001", imds_env)
        check(code == "ready" and FakeImds.hits > 0
              and "RegisterUsage" not in calls(emulator, "AKIAUNBAKEDIMDS00001"),
              f"imds: the unbaked build takes the EC2 path ({code}, {FakeImds.hits} IMDS hits)")
        FakeImds.hits = 0
        cfg, port = config(tmp, "baked-imds", platform="auto")
        code, _ = run(baked, cfg, port, "AKIABAKEDIMDS0000001", imds_env)
        check(FakeImds.hits == 0, f"imds: the baked build never asks IMDS ({FakeImds.hits} hits)")
        check(code == 65 and calls(emulator, "AKIABAKEDIMDS0000001") == ["RegisterUsage"],
              f"imds: the baked build registers (exit {code})")

        # AWS_ENDPOINT_URL is ignored by the baked build: its call still reaches the baked endpoint.
        cfg, port = config(tmp, "baked-env")
        code, err = run(baked, cfg, port, "AKIABAKEDENV00000001",
                        {"AWS_ENDPOINT_URL": decoy, "AWS_ENDPOINT_URL_MARKETPLACE_METERING": decoy})
        check(code == 65 and calls(emulator, "AKIABAKEDENV00000001") == ["RegisterUsage"],
              f"env: the baked build ignores AWS_ENDPOINT_URL* (exit {code})")
        check("ignored: a locked build sends only to AWS" in err, "env: and says so")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"baked: {len(failures)} failed" if failures else "baked: every check passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
