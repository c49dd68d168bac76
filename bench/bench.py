#!/usr/bin/env python3
"""meterd benchmark driver; run it through bench/run.sh (see bench/README.md).

Everything runs on loopback. meterd and the reference (nginx-light answering 204) are
measured side by side in the same run, alternating, and each figure is the median of the
repeats. Every process started here is stopped in a `finally` block.
"""

import atexit
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
BIN = os.environ.get("METERD_BIN", os.path.join(ROOT, "target/release/meterd"))
LOADGEN = os.path.join(ROOT, "target/bench/loadgen")
PRODUCT = "prod-demo1234"
DIMENSIONS = [f"dim{i:02d}" for i in range(1, 25)]
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = 64
DEMO_KEY = os.path.join(ROOT, "src/emulator/demo-signing-key.pem")

TARGETS = {
    "ratio": 0.60,
    "batch": 1_000_000,
    "p99_half": 5.0,
    "idle_rss": 20.0,
    "rss_10k": 64.0,
    "ready": 200.0,
    "seal": 2.0,
    "binary": 25.0,
}

# The dimension each aggregation is measured on (bench_aggregations).
AGGREGATIONS = {"sum": "dim01", "max": "dim02", "last": "dim03", "unique": "dim04"}

PROCS = []


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env=None, out=None):
    # A session of its own, so cleanup() also reaches what it forks (nginx's workers).
    p = subprocess.Popen(
        cmd,
        env=env,
        stdout=out or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
        start_new_session=True,
    )
    PROCS.append(p)
    return p


def cleanup():
    """Kills every process started here, with everything it forked."""
    for p in PROCS:
        # Not yet reaped, so its process group id cannot have been reused.
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    PROCS.clear()


def stop(p, timeout=60):
    """SIGTERM and wait; returns seconds from the signal to the exit."""
    if p.poll() is not None:
        return 0.0
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return time.monotonic() - t


def http(method, url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("GET", url, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def rss_mb(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                fields[k] = int(v.split()[0]) / 1024.0
    return fields["VmRSS"], fields["VmHWM"]


def metrics(addr):
    status, body = http("GET", f"http://{addr}/metrics")
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r"^(meterd_[a-z_]+_total) ([\d.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url, script, connections=CONNECTIONS, seconds=SECONDS, threads=2, env=None):
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                         env=None if env is None else {**os.environ, **env}).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[pct] = float(m.group(1)) * UNITS[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": lat["50"],
        "p99": lat["99"],
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def loadgen_rate(addr, body_file, rate, seconds=SECONDS, connections=CONNECTIONS):
    out = subprocess.run(
        [LOADGEN, "rate", addr, "/v1/usage", body_file, str(rate), str(seconds), str(connections)],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return {k: float(v) for k, v in (kv.split("=") for kv in out.stdout.split())}


def fsync_counter(pid, seconds):
    """Counts fsync/fdatasync syscalls of `pid` for `seconds` with perf tracepoints (or None)."""
    if not shutil.which("perf"):
        return None
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync",
         "-p", str(pid), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def fsync_count(proc):
    if proc is None:
        return None
    _, err = proc.communicate()
    total = 0
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("syscalls:") and parts[0].isdigit():
            total += int(parts[0])
    return total if proc.returncode == 0 else None


def cpu_seconds(pids, children=False):
    """User + system CPU time of processes (all their threads), from /proc; with `children`,
    also that of their reaped children (PostgreSQL's backends, which exit with their client)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
        total += ticks / os.sysconf("SC_CLK_TCK")
    return total


def nginx_pids(master):
    """The nginx master and its workers."""
    out = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True).stdout
    return [master.pid] + [int(p) for p in out.split()]


class FsyncProbe:
    """Overwrites 4 KiB and fsyncs it every 5 ms next to the ledger: the disk's own latency."""

    def __init__(self, directory):
        import threading
        self.path = os.path.join(directory, "fsync-probe")
        self.latencies = []
        self.stop_flag = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        os.pwrite(fd, b"\0" * 4096, 0)
        os.fsync(fd)
        while not self.stop_flag:
            t = time.perf_counter()
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
            self.latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(0.005)
        os.close(fd)

    def stop(self):
        self.stop_flag = True
        self.thread.join()
        lat = sorted(self.latencies)
        pick = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")
        return {"p50": pick(50), "p99": pick(99), "max": lat[-1] if lat else float("nan")}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class Rig:
    """One emulator plus the files every agent needs."""

    def __init__(self, work):
        self.work = work
        self.emu_addr = f"127.0.0.1:{free_port()}"
        emu_conf = os.path.join(work, "emulator.toml")
        with open(emu_conf, "w") as f:
            f.write(
                f'region = "us-east-1"\n'
                f"[[products]]\ncode = \"{PRODUCT}\"\ndimensions = {json.dumps(DIMENSIONS)}\n"
                f"[[keys]]\nversion = 1\nprivate_key_path = {json.dumps(DEMO_KEY)}\n"
                # The agent's own speed: the account's quota (10 MeterUsage a second) alone
                # makes a 24-record flush take over a second (docs/PERFORMANCE.md).
                f"[quotas]\nenabled = false\n"
            )
        self.key = os.path.join(work, "emulator-v1.pem")
        self.emulator = start(
            [BIN, "emulator", "--listen", self.emu_addr, "--config", emu_conf,
             "--public-key-out", self.key],
            out=open(os.path.join(work, "emulator.log"), "w"),
        )
        wait_http(f"http://{self.emu_addr}/_emulator/records")
        self.agents = 0

    def agent_config(self, name, addr, metering=""):
        state = os.path.join(self.work, name, "state")
        os.makedirs(state, exist_ok=True)
        path = os.path.join(self.work, name, "meterd.toml")
        with open(path, "w") as f:
            f.write(
                f'product_code = "{PRODUCT}"\npricing = "hourly+custom"\nplatform = "ecs"\n'
                f"[metering]\ndimensions = {json.dumps(DIMENSIONS)}\n"
                f'tag_keys = ["tenant"]\nmax_allocations = 500\n{metering}'
                f"[registration]\npublic_key_files = [{json.dumps(self.key)}]\n"
                f'[server]\nlisten = "{addr}"\ngrace_period = "60s"\n'
                f"[state]\ndir = {json.dumps(state)}\n"
                f'[aws]\nregion = "us-east-1"\nendpoint_url = "http://{self.emu_addr}"\n'
                # The pipeline's own speed: not the fleet's call limit (2 a second by default,
                # which alone makes 24 records take 12 s; docs/PERFORMANCE.md).
                f'[sending]\nseal_delay = "2s"\nmax_calls_per_second = 1000\n'
            )
        return path

    def agent_env(self):
        # Each agent is its own caller identity, so their records for the same hour do not
        # collide in the emulator.
        self.agents += 1
        self.last_identity = f"AKIABENCH{self.agents:011d}"
        env = dict(os.environ)
        env.update({
            "AWS_ACCESS_KEY_ID": self.last_identity,
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_EC2_METADATA_DISABLED": "true",
            "METERD_LOG_FORMAT": "json",
            "METERD_LOG": "info",
        })
        return env

    def start_agent(self, name, metering="", wrapper=(), ready_timeout=30.0):
        """Starts `meterd run` (under `wrapper`, such as valgrind, if given) and waits for ready."""
        addr = f"127.0.0.1:{free_port()}"
        config = self.agent_config(name, addr, metering)
        p = start([*wrapper, BIN, "run", "--config", config], env=self.agent_env(),
                  out=open(os.path.join(self.work, name, "meterd.log"), "w"))
        wait_http(f"http://{addr}/readyz", timeout=ready_timeout)
        return p, addr



class Redis:
    """redis-server with `appendfsync always` (an fsync before each reply batch), data under
    the work directory; driven by redis-benchmark's INCR over 100,000 keys."""

    def __init__(self, work):
        self.dir = os.path.join(work, "redis")
        os.makedirs(self.dir)
        self.port = free_port()
        self.proc = start(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", os.path.join(self.dir, "redis.log")])
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start; see " + self.dir)
            time.sleep(0.05)

    def run(self, requests):
        """`redis-benchmark -c 64 -t incr`: requests/s, p50/p99 (ms), redis-benchmark's CPU."""
        cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.port), "-c", str(CONNECTIONS),
               "-n", str(requests), "-r", "100000", "-t", "incr", "--csv"]
        c0 = children_cpu()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        client_s = children_cpu() - c0
        row = [l for l in out.stdout.splitlines() if l.startswith('"INCR"')]
        if out.returncode != 0 or not row:
            raise RuntimeError(f"redis-benchmark failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        f = [float(x.strip('"')) for x in row[0].split(",")[1:]]
        # test, rps, avg, min, p50, p95, p99, max
        return {"rps": f[0], "p50": f[3], "p99": f[5], "client_us": client_s / requests * 1e6}


class Postgres:
    """A throwaway PostgreSQL cluster under the work directory (`synchronous_commit = on`, the
    default, and `fsync = on`); driven by pgbench with an upsert over 100,000 keys."""

    SCRIPT = ("\\set k random(1, 100000)\n"
              "INSERT INTO counters (k, n) VALUES (:k, 1) "
              "ON CONFLICT (k) DO UPDATE SET n = counters.n + 1;\n")

    def __init__(self, work):
        self.bindir = postgres_bindir()
        self.dir = os.path.join(work, "postgres")
        self.data = os.path.join(self.dir, "data")
        os.makedirs(self.dir)
        # initdb and the server refuse to run as root: as root they run as the postgres user,
        # which needs to reach the directory.
        self.as_user = []
        if os.geteuid() == 0:
            os.chmod(work, 0o711)
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
            if subprocess.run(self.as_user + ["test", "-w", self.dir]).returncode != 0:
                # A checkout under a private home (/root): the cluster goes to /var/tmp, which
                # is on the disk too (never tmpfs), and is removed when the bench exits.
                self.dir = tempfile.mkdtemp(prefix="meterd-bench-postgres-", dir="/var/tmp")
                atexit.register(shutil.rmtree, self.dir, True)
                self.data = os.path.join(self.dir, "data")
                shutil.chown(self.dir, "postgres", "postgres")
                print(f"bench: the postgres user cannot reach {work}; its cluster is in {self.dir}",
                      file=sys.stderr)
        self.port = free_port()
        self.pg(["initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\nmax_connections = 100\n"
                    "synchronous_commit = on\nfsync = on\n")
        self.proc = start(self.as_user + [os.path.join(self.bindir, "postgres"), "-D", self.data],
                          out=open(os.path.join(work, "postgres.log"), "w"))
        deadline = time.monotonic() + 30
        while self.psql("SELECT 1").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("postgres did not start; see " + os.path.join(work, "postgres.log"))
            time.sleep(0.1)
        setup = self.psql("CREATE TABLE counters (k integer PRIMARY KEY, n bigint NOT NULL)")
        if setup.returncode != 0:
            raise RuntimeError("postgres setup: " + setup.stderr)
        self.script = os.path.join(work, "upsert.sql")
        with open(self.script, "w") as f:
            f.write(self.SCRIPT)

    def pg(self, cmd):
        out = subprocess.run(self.as_user + [os.path.join(self.bindir, cmd[0])] + cmd[1:],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]}: {out.stderr[-500:]}")

    def psql(self, sql):
        return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-X", "-q", "-c", sql, "postgres"], capture_output=True, text=True)

    def run(self, seconds):
        """`pgbench -c 64 -j 2 -M prepared -T seconds`: transactions/s, mean latency (ms)."""
        cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-n",
               "-c", str(CONNECTIONS), "-j", "2", "-M", "prepared", "-T", str(seconds),
               "-f", self.script, "postgres"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
        lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
        if out.returncode != 0 or not tps:
            raise RuntimeError(f"pgbench failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        return {"rps": float(tps.group(1)), "mean_ms": float(lat.group(1)) if lat else float("nan"),
                "failed": int(failed.group(1)) if failed else 0}


def postgres_bindir():
    """Debian's PostgreSQL server binaries (the newest installed major version)."""
    versions = sorted((d for d in os.listdir("/usr/lib/postgresql") if d.isdigit()), key=int) \
        if os.path.isdir("/usr/lib/postgresql") else []
    if not versions:
        sys.exit("bench: PostgreSQL is missing; apt-get install postgresql")
    return os.path.join("/usr/lib/postgresql", versions[-1], "bin")


def children_cpu():
    """CPU time (user + sys) of this process's waited-for children: the load tools."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def start_nginx(work):
    port = free_port()
    d = os.path.join(work, "nginx")
    os.makedirs(d)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 204; }}
    }}
}}
""")
    p = start(["nginx", "-p", d, "-c", conf, "-e", f"{d}/error.log"])
    deadline = time.monotonic() + 10
    while True:
        try:
            if http("POST", f"http://127.0.0.1:{port}/v1/usage", b"{}", timeout=1)[0] == 204:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError("nginx did not start; see " + d)
        time.sleep(0.02)
    return p, f"127.0.0.1:{port}"


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_mb": mem,
        "kernel": platform.release(),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def bench_single(rig, nginx, nginx_addr, agent, addr, results, redis, postgres):
    log(f"single events: wrk -c{CONNECTIONS} -d{SECONDS}s, {REPEATS}x nginx/meterd/Redis/PostgreSQL alternating")
    script = os.path.join(BENCH, "wrk/single.lua")
    runs = {"nginx": [], "meterd": [], "redis": [], "postgres": []}
    durability = []
    pids = nginx_pids(nginx)
    for i in range(REPEATS):
        c0 = cpu_seconds(pids)
        runs["nginx"].append(wrk(f"http://{nginx_addr}/v1/usage", script))
        runs["nginx"][-1]["cpu_us"] = (cpu_seconds(pids) - c0) / (runs["nginx"][-1]["rps"] * SECONDS) * 1e6
        before = metrics(addr)
        counter = fsync_counter(agent.pid, SECONDS)
        c0 = cpu_seconds([agent.pid])
        t = time.monotonic()
        r = wrk(f"http://{addr}/v1/usage", script)
        elapsed = time.monotonic() - t
        r["cpu_us"] = (cpu_seconds([agent.pid]) - c0) / (r["rps"] * SECONDS) * 1e6
        fsyncs = fsync_count(counter)
        after = metrics(addr)
        runs["meterd"].append(r)
        commits = after["meterd_ledger_commits_total"] - before["meterd_ledger_commits_total"]
        events = after["meterd_events_accepted_total"] - before["meterd_events_accepted_total"]
        requests = after["meterd_ledger_commands_total"] - before["meterd_ledger_commands_total"]
        commit_s = after.get("meterd_ledger_commit_seconds_total", 0) - before.get(
            "meterd_ledger_commit_seconds_total", 0)
        durability.append({
            "commits_per_s": commits / elapsed,
            "fsyncs_per_s": (fsyncs / SECONDS) if fsyncs is not None else None,
            "events_per_commit": events / commits if commits else float("nan"),
            "requests_per_commit": requests / commits if commits else float("nan"),
            "commit_ms": (commit_s / commits * 1e3) if commits and commit_s else None,
        })
        # redis-benchmark takes a request count, not a duration: about SECONDS at its last rate.
        rate = median([x["rps"] for x in runs["redis"]]) if runs["redis"] else r["rps"]
        requests = max(10_000, int(rate * SECONDS))
        c0 = cpu_seconds([redis.proc.pid])
        runs["redis"].append(redis.run(requests))
        runs["redis"][-1]["cpu_us"] = (cpu_seconds([redis.proc.pid]) - c0) / requests * 1e6
        c0 = cpu_seconds([postgres.proc.pid], children=True)
        runs["postgres"].append(postgres.run(SECONDS))
        runs["postgres"][-1]["cpu_us"] = ((cpu_seconds([postgres.proc.pid], children=True) - c0)
                                          / (runs["postgres"][-1]["rps"] * SECONDS) * 1e6)
        log(f"  run {i + 1}: nginx {runs['nginx'][-1]['rps']:.0f}/s, meterd {r['rps']:.0f}/s "
            f"(p99 {r['p99']:.2f} ms, non-2xx {r['non2xx']}, {durability[-1]['events_per_commit']:.1f} events/commit), "
            f"Redis {runs['redis'][-1]['rps']:.0f}/s, PostgreSQL {runs['postgres'][-1]['rps']:.0f}/s "
            f"(failed {runs['postgres'][-1]['failed']})")
    for name in ("nginx", "meterd", "redis"):
        results[f"single_{name}"] = {k: median([r[k] for r in runs[name]]) for k in ("rps", "p50", "p99", "cpu_us")}
    for name in ("nginx", "meterd"):
        results[f"single_{name}"]["non2xx"] = sum(r["non2xx"] for r in runs[name])
    results["single_postgres"] = {k: median([r[k] for r in runs["postgres"]]) for k in ("rps", "mean_ms", "cpu_us")}
    results["single_postgres"]["failed"] = sum(r["failed"] for r in runs["postgres"])
    if results["single_postgres"]["failed"]:
        raise RuntimeError(f"pgbench reported {results['single_postgres']['failed']} failed transactions")
    results["single_runs"] = runs
    results["ratio"] = results["single_meterd"]["rps"] / results["single_nginx"]["rps"]
    fs = [d["fsyncs_per_s"] for d in durability if d["fsyncs_per_s"] is not None]
    cm = [d["commit_ms"] for d in durability if d["commit_ms"] is not None]
    results["durability"] = {
        "commits_per_s": median([d["commits_per_s"] for d in durability]),
        "fsyncs_per_s": median(fs) if fs else None,
        "events_per_commit": median([d["events_per_commit"] for d in durability]),
        "requests_per_commit": median([d["requests_per_commit"] for d in durability]),
        "commit_ms": median(cm) if cm else None,
    }


def bench_half(work, nginx_addr, addr, results):
    rate = int(results["single_meterd"]["rps"] / 2)
    log(f"p99 at half of meterd's max: open-loop {rate}/s over {CONNECTIONS} connections, {REPEATS}x")
    body = os.path.join(BENCH, "wrk/single.json")
    runs = {"nginx": [], "meterd": []}
    probes = []
    for _ in range(REPEATS):
        # The disk's own fsync latency, probed while nginx runs (so it does not slow meterd).
        probe = FsyncProbe(work)
        runs["nginx"].append(loadgen_rate(nginx_addr, body, rate))
        probes.append(probe.stop())
        runs["meterd"].append(loadgen_rate(addr, body, rate))
        m = runs["meterd"][-1]
        log(f"  meterd p50 {m['p50_ms']:.2f} ms p99 {m['p99_ms']:.2f} ms at {m['rate']:.0f}/s "
            f"(errors {m['errors']:.0f}, non-2xx {m['non2xx']:.0f}); nginx p99 {runs['nginx'][-1]['p99_ms']:.2f} ms")
    results["half_rate"] = rate
    results["disk_fsync"] = {k: median([p[k] for p in probes]) for k in ("p50", "p99", "max")}
    log(f"  disk fsync probe: p50 {results['disk_fsync']['p50']:.2f} ms, p99 {results['disk_fsync']['p99']:.2f} ms, "
        f"max {results['disk_fsync']['max']:.1f} ms")
    for name in runs:
        results[f"half_{name}"] = {k: median([r[k] for r in runs[name]])
                                   for k in ("rate", "p50_ms", "p99_ms", "p999_ms", "errors", "non2xx")}


def bench_batch(addr, results):
    log(f"batches of 1,000 events: wrk -c16 -d{SECONDS}s, {REPEATS}x")
    script = os.path.join(BENCH, "wrk/batch.lua")
    runs = []
    for _ in range(REPEATS):
        before = metrics(addr)
        t = time.monotonic()
        r = wrk(f"http://{addr}/v1/usage", script, connections=16)
        elapsed = time.monotonic() - t
        after = metrics(addr)
        r["events_per_s"] = (after["meterd_events_accepted_total"] - before["meterd_events_accepted_total"]) / elapsed
        r["increments_per_s"] = r["rps"] * 1000
        runs.append(r)
        log(f"  {r['increments_per_s']:.0f} increments/s (ledger counted {r['events_per_s']:.0f}/s), "
            f"p99 {r['p99']:.1f} ms, non-2xx {r['non2xx']}")
    results["batch"] = {k: median([r[k] for r in runs]) for k in ("increments_per_s", "events_per_s", "p50", "p99")}
    results["batch"]["non2xx"] = sum(r["non2xx"] for r in runs)


def bench_aggregations(rig, results):
    """Ingest cost per aggregation, side by side on one agent: single events and 1,000-event
    batches on a dimension of each aggregation, the aggregations alternating in each round."""
    log(f"ingest per aggregation: single events (wrk -c64) and 1,000-event batches (wrk -c16), "
        f"{SECONDS} s each, {REPEATS}x")
    aggregation = ", ".join(f'{d} = "{a}"' for a, d in AGGREGATIONS.items() if a != "sum")
    agent, addr = rig.start_agent("aggregations", f"aggregation = {{ {aggregation} }}\n")
    runs = {a: [] for a in AGGREGATIONS}
    try:
        for _ in range(REPEATS):
            for agg, dim in AGGREGATIONS.items():
                env = {"BENCH_DIM": dim, "BENCH_UNIQUE": "1" if agg == "unique" else "0",
                       "BENCH_SUM": "1" if agg == "sum" else "0"}
                single = wrk(f"http://{addr}/v1/usage", os.path.join(BENCH, "wrk/agg_single.lua"), env=env)
                batch = wrk(f"http://{addr}/v1/usage", os.path.join(BENCH, "wrk/agg_batch.lua"),
                            connections=16, env=env)
                r = {"single_rps": single["rps"], "single_p99": single["p99"],
                     "batch_events_per_s": batch["rps"] * 1000, "batch_p99": batch["p99"],
                     "non2xx": single["non2xx"] + batch["non2xx"]}
                runs[agg].append(r)
                log(f"  {agg:6}: {r['single_rps']:,.0f} single/s (p99 {r['single_p99']:.1f} ms), "
                    f"{r['batch_events_per_s']:,.0f} batched events/s (p99 {r['batch_p99']:.1f} ms), "
                    f"non-2xx {r['non2xx']}")
    finally:
        stop(agent)
    results["aggregations"] = {
        agg: {**{k: median([r[k] for r in rs]) for k in ("single_rps", "single_p99", "batch_events_per_s", "batch_p99")},
              "non2xx": sum(r["non2xx"] for r in rs)}
        for agg, rs in runs.items()
    }
    bad = {a: r["non2xx"] for a, r in results["aggregations"].items() if r["non2xx"]}
    if bad:
        raise RuntimeError(f"aggregation runs got non-2xx answers: {bad}")


def bench_tagsets(rig, results):
    log("memory: fresh agent, idle RSS, then 10,000 distinct tag sets under load")
    agent, addr = rig.start_agent("tagsets")
    time.sleep(2)
    results["idle_rss"], _ = rss_mb(agent.pid)
    for chunk in range(10):
        events = [{"dimension": "dim01", "quantity": 1, "tags": {"tenant": f"t{chunk * 1000 + i:05d}"}}
                  for i in range(1000)]
        status, body = http("POST", f"http://{addr}/v1/usage", json.dumps({"events": events}).encode())
        if status != 200:
            raise RuntimeError(f"tag set preload: {status} {body[:200]!r}")
    r1 = wrk(f"http://{addr}/v1/usage", os.path.join(BENCH, "wrk/tags10k.lua"))
    r2 = wrk(f"http://{addr}/v1/usage", os.path.join(BENCH, "wrk/tags10k_batch.lua"), connections=16)
    status, body = http("GET", f"http://{addr}/v1/usage/current")
    rows = len(json.loads(body)["usage"])
    results["rss_10k"], results["hwm_10k"] = rss_mb(agent.pid)
    results["tagsets_rows"] = rows
    results["tagsets_load"] = f"{r1['rps']:.0f} single/s + {r2['rps'] * 1000:.0f} batched events/s"
    log(f"  idle {results['idle_rss']:.1f} MB; {rows} rows in the open hour; RSS {results['rss_10k']:.1f} MB "
        f"(peak {results['hwm_10k']:.1f} MB); non-2xx {r1['non2xx'] + r2['non2xx']}")
    stop(agent)


def bench_ready(rig, results):
    log(f"start-up: process start to /readyz 200, {max(REPEATS, 5)}x, fresh state each time")
    times = []
    for i in range(max(REPEATS, 5)):
        addr = f"127.0.0.1:{free_port()}"
        config = rig.agent_config(f"ready{i}", addr)
        out = subprocess.run([LOADGEN, "ready", addr, "10000", BIN, "run", "--config", config],
                             env=rig.agent_env(), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        times.append(float(out.stdout.split("=")[1]))
    results["ready_ms"] = median(times)
    results["ready_runs"] = times
    log(f"  {', '.join(f'{t:.0f}' for t in times)} ms")


def bench_seal(rig, results):
    log("sealing: 24 dimensions x 500 tag sets, closed by the SIGTERM final flush")
    runs = []
    for i in range(REPEATS):
        agent, addr = rig.start_agent(f"seal{i}")
        events = [{"dimension": d, "quantity": 1 + (t % 7), "tags": {"tenant": f"t{t:03d}"}}
                  for d in DIMENSIONS for t in range(500)]
        for start_i in range(0, len(events), 6000):
            status, body = http("POST", f"http://{addr}/v1/usage",
                                json.dumps({"events": events[start_i:start_i + 6000]}).encode())
            if status != 200:
                raise RuntimeError(f"seal preload: {status} {body[:200]!r}")
        identity = rig.last_identity
        took = stop(agent)
        records = json.loads(http("GET", f"http://{rig.emu_addr}/_emulator/records")[1])
        mine = [r for r in records
                if r["identity"] == identity and len(r.get("allocations") or []) == 500]
        phases = seal_phases(os.path.join(rig.work, f"seal{i}", "meterd.log"))
        runs.append({"total": took, **phases, "records_500": len(mine)})
        log(f"  SIGTERM to exit {took * 1000:.0f} ms (seal {phases.get('seal_ms', float('nan')):.0f} ms, "
            f"send {phases.get('send_ms', float('nan')):.0f} ms); {len(mine)} records with 500 allocations billed")
    results["seal"] = {k: median([r[k] for r in runs if k in r]) for k in ("total", "seal_ms", "send_ms")}
    results["seal"]["records_500"] = min(r["records_500"] for r in runs)
    if results["seal"]["records_500"] != len(DIMENSIONS):
        raise RuntimeError(f"sealing billed {results['seal']['records_500']} full records, not {len(DIMENSIONS)}")


def seal_phases(log_path):
    """Durations from the agent's JSON log: SIGTERM → sealed, sealed → all delivered."""
    stamps = {}
    with open(log_path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            msg = e.get("message", "")
            ts = e.get("timestamp")
            if not ts:
                continue
            t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            if msg == "SIGTERM received":
                stamps["term"] = t
            elif msg.startswith("sealed the open hour"):
                stamps["sealed"] = t
            elif msg.startswith("all records delivered"):
                stamps["sent"] = t
    out = {}
    if "term" in stamps and "sealed" in stamps:
        out["seal_ms"] = (stamps["sealed"] - stamps["term"]) * 1000
    if "sealed" in stamps and "sent" in stamps:
        out["send_ms"] = (stamps["sent"] - stamps["sealed"]) * 1000
    return out


def image_size(results):
    if os.environ.get("BENCH_IMAGE") == "0":
        results["image"] = (None, "skipped (BENCH_IMAGE=0)")
        return
    podman = shutil.which("podman")
    if not podman:
        results["image"] = (None, "podman is not installed")
        return
    cmd = [podman, "--runtime", "runc", "--cgroup-manager=cgroupfs"]
    tag = "localhost/meterd:bench"
    if subprocess.run(cmd + ["image", "exists", "docker.io/library/debian:bookworm-slim"]).returncode == 0:
        log("container image: podman build --target runtime-prebuilt (as scripts/container-test.sh)")
        b = subprocess.run(cmd + ["build", "--quiet", "--pull=never", "--format", "docker", "--network=host",
                                  "--build-arg", f"METERD_PRODUCT_CODE={PRODUCT}",
                                  "--target", "runtime-prebuilt",
                                  "-t", tag, "-f", "deploy/Dockerfile", "."],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        if b.returncode == 0:
            size = subprocess.run(cmd + ["image", "inspect", tag, "--format", "{{.Size}}"],
                                  capture_output=True, text=True).stdout.strip()
            # .dockerignore admits only target/release/meterd into the build context.
            results["image"] = (int(size) / 1e6, "built now from target/release/meterd")
            return
        log("  image build failed: " + b.stderr.strip()[-300:])
    for existing in ("localhost/meterd:test",):
        size = subprocess.run(cmd + ["image", "inspect", existing, "--format", "{{.Size}}"],
                              capture_output=True, text=True)
        if size.returncode == 0:
            results["image"] = (int(size.stdout.strip()) / 1e6, f"{existing} from scripts/container-test.sh")
            return
    results["image"] = (None, "no base image for podman build and no image from scripts/container-test.sh")


def verdict(ok):
    return "met" if ok else "**missed**"


def table(results):
    r = results
    d = r["durability"]
    rows = [
        ("durable single-event throughput (wrk, 64 conns)",
         f"meterd {r['single_meterd']['rps']:,.0f}/s vs nginx 204 {r['single_nginx']['rps']:,.0f}/s = **{r['ratio'] * 100:.0f}%**",
         "≥ 60% of nginx", verdict(r["ratio"] >= TARGETS["ratio"])),
        ("durable single increments against Redis `appendfsync always` (64 clients, alternating)",
         f"meterd {r['single_meterd']['rps']:,.0f}/s vs Redis {r['single_redis']['rps']:,.0f}/s = "
         f"**{r['single_meterd']['rps'] / r['single_redis']['rps']:.2f}×**",
         "≥ 1.0×", verdict(r["single_meterd"]["rps"] >= r["single_redis"]["rps"])),
        ("CPU per single-event request (user+sys, from /proc)",
         f"meterd {r['single_meterd']['cpu_us']:.1f} µs, nginx {r['single_nginx']['cpu_us']:.1f} µs", "—", "—"),
        ("single-event latency at max (wrk, 64 conns)",
         f"meterd p50 {r['single_meterd']['p50']:.2f} ms, p99 {r['single_meterd']['p99']:.2f} ms; "
         f"nginx p50 {r['single_nginx']['p50']:.2f} ms, p99 {r['single_nginx']['p99']:.2f} ms", "—", "—"),
        (f"p99 at half of max ({r['half_rate']:,}/s open loop, 64 conns)",
         f"meterd p50 {r['half_meterd']['p50_ms']:.2f} ms, **p99 {r['half_meterd']['p99_ms']:.2f} ms** "
         f"(p99.9 {r['half_meterd']['p999_ms']:.2f}); nginx p99 {r['half_nginx']['p99_ms']:.2f} ms; "
         f"disk fsync probe p50 {r['disk_fsync']['p50']:.2f} ms, p99 {r['disk_fsync']['p99']:.1f} ms, max {r['disk_fsync']['max']:.0f} ms",
         "≤ 5 ms", verdict(r["half_meterd"]["p99_ms"] <= TARGETS["p99_half"])),
        ("batch ingest (1,000-event batches, wrk 16 conns)",
         f"**{r['batch']['increments_per_s']:,.0f} increments/s** (p99 {r['batch']['p99']:.1f} ms per batch)",
         "≥ 1,000,000/s", verdict(r["batch"]["increments_per_s"] >= TARGETS["batch"])),
        ("cost of durability (during the single-event runs)",
         f"{d['commits_per_s']:,.0f} commits/s"
         + (f", {d['fsyncs_per_s']:,.0f} fsync+fdatasync syscalls/s" if d["fsyncs_per_s"] is not None else "")
         + f"; {d['events_per_commit']:.1f} events per commit"
         + (f"; {d['commit_ms']:.2f} ms per commit" if d["commit_ms"] else ""), "—", "—"),
        ("idle RSS", f"**{r['idle_rss']:.1f} MB**", "≤ 20 MB", verdict(r["idle_rss"] <= TARGETS["idle_rss"])),
        ("RSS with 10,000 tag sets",
         f"**{r['rss_10k']:.1f} MB** (peak {r['hwm_10k']:.1f} MB; {r['tagsets_rows']:,} rows; {r['tagsets_load']})",
         "≤ 64 MB", verdict(r["rss_10k"] <= TARGETS["rss_10k"])),
        ("start to ready (RegisterUsage + PS256)",
         f"**{r['ready_ms']:.0f} ms** (runs: {', '.join(f'{t:.0f}' for t in r['ready_runs'])})",
         "≤ 200 ms", verdict(r["ready_ms"] <= TARGETS["ready"])),
        ("seal and send 24 × 500 (SIGTERM final flush)",
         f"**{r['seal']['total'] * 1000:.0f} ms** SIGTERM→exit (seal {r['seal'].get('seal_ms', float('nan')):.0f} ms, "
         f"send {r['seal'].get('send_ms', float('nan')):.0f} ms)",
         "≤ 2 s", verdict(r["seal"]["total"] <= TARGETS["seal"])),
    ] + [
        (f"ingest, `{agg}` dimension (single events, wrk 64 conns; 1,000-event batches, wrk 16 conns)",
         f"{a['single_rps']:,.0f} single/s (p99 {a['single_p99']:.1f} ms, "
         f"{a['single_rps'] / r['aggregations']['sum']['single_rps'] * 100:.0f}% of sum); "
         f"{a['batch_events_per_s']:,.0f} batched events/s (p99 {a['batch_p99']:.1f} ms, "
         f"{a['batch_events_per_s'] / r['aggregations']['sum']['batch_events_per_s'] * 100:.0f}% of sum)",
         "—", "—")
        for agg, a in r["aggregations"].items()
    ] + [
        ("stripped release binary", f"**{r['binary_mb']:.1f} MB**", "≤ 25 MB",
         verdict(r["binary_mb"] <= TARGETS["binary"])),
        ("container image",
         f"{r['image'][0]:.1f} MB ({r['image'][1]})" if r["image"][0] else f"n/a: {r['image'][1]}", "—", "—"),
    ]
    m = r["machine"]
    lines = [
        f"# meterd benchmark, {r['date']}",
        "",
        f"Machine: {m['nproc']} × {m['cpu']}, {m['mem_mb']:,} MB RAM, kernel {m['kernel']}; "
        f"load average at start {m['load_start']}, at end {m['load_end']}. "
        f"Ledger on {r['disk']}. Each figure is the median of {REPEATS} runs of {SECONDS} s unless noted.",
        "",
        "| what | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    lines.append("")
    lines += peer_table(r)
    return "\n".join(lines)


def peer_table(r):
    """meterd against the loopback limit and the durable stores a seller might use instead:
    the same 64 clients, alternating in the single-event rounds above."""
    m = r["single_meterd"]["rps"]
    v = r["versions"]
    peers = [
        (f"nginx {v['nginx']} returning 204 (no body, no disk), wrk -t2 -c64", r["single_nginx"],
         f"p99 {r['single_nginx']['p99']:.2f} ms"),
        (f"Redis {v['redis']}, `appendfsync always`, `INCR` over 100,000 keys, redis-benchmark -c64",
         r["single_redis"], f"p99 {r['single_redis']['p99']:.2f} ms"),
        (f"PostgreSQL {v['postgres']}, `synchronous_commit = on`, `INSERT … ON CONFLICT DO UPDATE` "
         f"over 100,000 keys, pgbench -c64 -j2 -M prepared", r["single_postgres"],
         f"mean {r['single_postgres']['mean_ms']:.2f} ms"),
    ]
    lines = [
        "| system (64 clients, one increment a request) | increments/s | server CPU per request | latency | meterd against it |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, x, latency in peers:
        lines.append(f"| {name} | {x['rps']:,.0f} | {x['cpu_us']:.1f} µs | {latency} | **{m / x['rps']:.2f}×** |")
    lines.append(f"| meterd, `POST /v1/usage` with one event, wrk -t2 -c64 | {m:,.0f} | "
                 f"{r['single_meterd']['cpu_us']:.1f} µs | p99 {r['single_meterd']['p99']:.2f} ms | – |")
    lines.append("")
    return lines


def versions():
    def first(cmd, pattern):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            out = done.stdout + done.stderr
        except OSError:
            return "?"
        m = re.search(pattern, out)
        return m.group(1) if m else "?"
    return {
        "nginx": first(["nginx", "-v"], r"nginx/([\d.]+)"),
        "redis": first(["redis-server", "--version"], r"v=([\d.]+)"),
        "postgres": first([os.path.join(postgres_bindir(), "postgres"), "--version"], r"([\d.]+)"),
    }


def main():
    for tool in ("wrk", "nginx", "redis-server", "redis-benchmark", "pgbench", "psql"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing; apt-get install wrk nginx-light redis-server postgresql")
    results = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
               "versions": versions()}
    results["machine"]["load_start"] = results["machine"].pop("load")
    results["binary_mb"] = os.path.getsize(BIN) / 1e6
    # On disk, not tmpfs: fsync must reach the device for durable acks to mean anything.
    work = tempfile.mkdtemp(prefix="bench.", dir=os.path.join(ROOT, "target"))
    df = subprocess.run(["df", "-T", work], capture_output=True, text=True).stdout.splitlines()[-1].split()
    results["disk"] = f"{df[0]} ({df[1]})"
    try:
        rig = Rig(work)
        nginx, nginx_addr = start_nginx(work)
        bench_ready(rig, results)
        redis, postgres = Redis(work), Postgres(work)
        agent, addr = rig.start_agent("load")
        bench_single(rig, nginx, nginx_addr, agent, addr, results, redis, postgres)
        stop(redis.proc)
        stop(postgres.proc)
        bench_half(work, nginx_addr, addr, results)
        bench_batch(addr, results)
        stop(agent)
        stop(nginx)
        bench_tagsets(rig, results)
        bench_aggregations(rig, results)
        bench_seal(rig, results)
        image_size(results)
    finally:
        cleanup()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    results["machine"]["load_end"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    text = table(results)
    print(text)
    out = os.environ.get("BENCH_OUT") or os.path.join(
        BENCH, "results", datetime.datetime.now().strftime("%Y-%m-%d-%H%M") + ".md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
        f.write("\n<details><summary>raw results</summary>\n\n```json\n")
        f.write(json.dumps(results, indent=1, default=str))
        f.write("\n```\n</details>\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
