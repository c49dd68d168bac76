#!/usr/bin/env python3
"""Proves `meterd run` sends READY=1 over NOTIFY_SOCKET, as Type=notify in
deploy/systemd/meterd.service requires.

Listens on a unix datagram socket, starts `meterd emulator` and `meterd run` against it
(loopback only, temp state dir), waits for READY=1, checks /readyz answers 200 by then,
sends SIGTERM and expects exit 0.

    scripts/systemd-notify-test.py [path/to/meterd]     # default target/debug/meterd
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/debug/meterd").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AGENT_PORT = free_port()


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def main() -> int:
    if not BIN.exists():
        print(f"systemd-notify-test: {BIN} missing (cargo build first)", file=sys.stderr)
        return 1
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="meterd-notify-"))
    procs = []
    try:
        sock_path = tmp / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(1.0)

        emu = subprocess.Popen(
            [str(BIN), "emulator", "--listen", "127.0.0.1:0",
             "--addr-file", str(tmp / "emulator.url"), "--public-key-out", str(tmp / "emulator.pem")],
            stdout=open(tmp / "emulator.log", "w"), stderr=subprocess.STDOUT)
        procs.append(emu)
        url_file = tmp / "emulator.url"
        wait_for(lambda: url_file.exists() and url_file.read_text().strip()
                 and (tmp / "emulator.pem").exists(), 20, "the emulator")
        url = url_file.read_text().strip()

        (tmp / "meterd.toml").write_text(f"""
product_code = "prod-demo1234"
pricing = "hourly+custom"
platform = "ecs"

[metering]
dimensions = ["requests", "gigabytes"]

[registration]
public_key_version = 1
public_key_files = ["{tmp / 'emulator.pem'}"]

[server]
listen = "127.0.0.1:{AGENT_PORT}"
grace_period = "10s"

[state]
dir = "{tmp / 'state'}"

[aws]
region = "us-east-1"
endpoint_url = "{url}"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ECS_", "KUBERNETES_"))}
        env.update(NOTIFY_SOCKET=str(sock_path), METERD_CONFIG=str(tmp / "meterd.toml"),
                   AWS_ACCESS_KEY_ID="AKIDNOTIFYTEST", AWS_SECRET_ACCESS_KEY="notify-test",
                   AWS_EC2_METADATA_DISABLED="true", METERD_LOG_FORMAT="json")
        started = time.monotonic()
        agent = subprocess.Popen([str(BIN), "run"], env=env,
                                 stdout=open(tmp / "agent.log", "w"), stderr=subprocess.STDOUT)
        procs.append(agent)

        messages = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
            if agent.poll() is not None:
                raise AssertionError(f"meterd run exited with {agent.returncode} before READY=1")
            try:
                messages.extend(sock.recv(4096).decode(errors="replace").splitlines())
            except socket.timeout:
                pass
        assert any(m == "READY=1" for m in messages), f"no READY=1 within 60s; got {messages}"
        print(f"READY=1 after {time.monotonic() - started:.2f}s; messages: {messages}", file=sys.stderr)

        req = urllib.request.Request(f"http://127.0.0.1:{AGENT_PORT}/readyz")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200, f"/readyz {r.status} after READY=1"

        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        try:
            while True:
                messages.extend(sock.recv(4096).decode(errors="replace").splitlines())
        except (socket.timeout, BlockingIOError):
            pass
        print(f"exit {code} after SIGTERM; all messages: {messages}", file=sys.stderr)
        assert code == 0, f"meterd run exited {code} after SIGTERM"
        print("systemd notify test: 1 passed, 0 failed")
        return 0
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        for log in ("agent.log", "emulator.log"):
            p = tmp / log
            if p.exists():
                print(f"---- {log} ----\n" + "\n".join(p.read_text().splitlines()[-30:]), file=sys.stderr)
        print("systemd notify test: 0 passed, 1 failed")
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    sys.exit(main())
