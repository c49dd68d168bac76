#!/usr/bin/env python3
"""Side-by-side comparison of meterd binaries (and nginx) in one run, for A/B figures.

    python3 bench/ab.py single SECONDS REPEATS NAME=BINARY[:VAR=VALUE,...] ...
    python3 bench/ab.py instructions SECONDS REPEATS NAME=BINARY[:VAR=VALUE,...] ...
    python3 bench/ab.py tagsets REPEATS NAME=BINARY[:VAR=VALUE,...] ...
    python3 bench/ab.py half RATE SECONDS REPEATS NAME=BINARY[:VAR=VALUE,...] ...

`single`: wrk -c64 with one event per request, nginx (204) first, then each agent, REPEATS
rounds; prints each run and the medians: requests/s, ratio to nginx, p99, CPU per request
(agent and wrk), events per commit, mean commit time and the WAL's size on disk.
`instructions`: each agent in turn under `valgrind --tool=callgrind`, its counters zeroed once
it is ready, then wrk -c64 for SECONDS; prints user-space instructions per request (callgrind
counts instructions, so the figure repeats on a busy machine; kernel time is not in it).
`tagsets`: bench.py's "RSS with 10,000 tag sets" row for each agent in turn, REPEATS rounds:
idle RSS, RSS and peak after the 10,000 tag sets.
`half`: the open-loop schedule of bench.py's p99 row at RATE requests/s, with the disk probe
running during nginx's turn. Every agent gets its own ledger against one emulator; the
optional VAR=VALUE pairs go into that agent's environment.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SINGLE = os.path.join(bench.BENCH, "wrk/single.lua")
SINGLE_BODY = os.path.join(bench.BENCH, "wrk/single.json")


def parse_specs(args):
    specs = []
    for arg in args:
        name, _, rest = arg.partition("=")
        binary, _, env = rest.partition(":")
        if not name or not binary:
            sys.exit(f"ab: expected NAME=BINARY[:VAR=VALUE,...], got {arg!r}")
        specs.append((name, os.path.abspath(binary), dict(kv.split("=", 1) for kv in env.split(",") if kv)))
    return specs


def wal_mb(pid):
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        path = os.path.realpath(os.path.join(fd_dir, fd))
        if path.endswith("-wal"):
            return os.path.getsize(path) / 1e6
    return float("nan")


def commit_figures(before, after):
    commits = after["meterd_ledger_commits_total"] - before["meterd_ledger_commits_total"]
    events = after["meterd_events_accepted_total"] - before["meterd_events_accepted_total"]
    seconds = after.get("meterd_ledger_commit_seconds_total", 0) - before.get(
        "meterd_ledger_commit_seconds_total", 0)
    if not commits:
        return "no commits"
    return f"{events / commits:5.1f} events/commit, {seconds / commits * 1e3:.2f} ms/commit"


def start_agents(rig, specs):
    agents = []
    saved = dict(os.environ)
    for name, binary, env in specs:
        bench.BIN = binary
        os.environ.update(env)
        try:
            proc, addr = rig.start_agent(name)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        agents.append((name, proc, addr))
    return agents


def single(work, rig, specs, seconds, repeats):
    nginx, nginx_addr = bench.start_nginx(work)
    targets = [("nginx", bench.nginx_pids(nginx), nginx_addr)]
    targets += [(n, [p.pid], a) for n, p, a in start_agents(rig, specs)]
    runs = {name: [] for name, _, _ in targets}
    for _ in range(repeats):
        for name, pids, addr in targets:
            before = bench.metrics(addr) if name != "nginx" else None
            cpu0, wrk0 = bench.cpu_seconds(pids), bench.children_cpu()
            r = bench.wrk(f"http://{addr}/v1/usage", SINGLE, seconds=seconds)
            n = r["rps"] * seconds
            r["cpu_us"] = (bench.cpu_seconds(pids) - cpu0) / n * 1e6
            r["wrk_us"] = (bench.children_cpu() - wrk0) / n * 1e6
            extra = ""
            if before is not None:
                extra = f", {commit_figures(before, bench.metrics(addr))}, WAL {wal_mb(pids[0]):.1f} MB"
            runs[name].append(r)
            print(f"{name:12s} {r['rps']:8.0f}/s p50 {r['p50']:5.2f} ms p99 {r['p99']:6.2f} ms "
                  f"CPU/request {r['cpu_us']:5.1f} us (wrk {r['wrk_us']:4.1f} us) "
                  f"non-2xx {r['non2xx']}{extra}; load {os.getloadavg()[0]:.2f}", flush=True)
    reference = statistics.median(r["rps"] for r in runs["nginx"])
    for name, rs in runs.items():
        rps = statistics.median(r["rps"] for r in rs)
        print(f"MEDIAN {name:12s} {rps:8.0f}/s = {rps / reference:.0%} of nginx, "
              f"p99 {statistics.median(r['p99'] for r in rs):.2f} ms, "
              f"CPU/request {statistics.median(r['cpu_us'] for r in rs):.1f} us")


def callgrind_total(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def instructions(work, rig, specs, seconds, repeats):
    runs = {name: [] for name, _, _ in specs}
    saved = dict(os.environ)
    for i in range(repeats):
        for name, binary, env in specs:
            out = os.path.join(work, f"callgrind.{name}.{i}")
            bench.BIN = binary
            os.environ.update(env)
            try:
                proc, addr = rig.start_agent(
                    f"{name}-{i}", wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
                    ready_timeout=120)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            before = bench.metrics(addr)
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            r = bench.wrk(f"http://{addr}/v1/usage", SINGLE, seconds=seconds)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
            after = bench.metrics(addr)
            bench.stop(proc)
            requests = after["meterd_ledger_commands_total"] - before["meterd_ledger_commands_total"]
            dumps = sorted(f for f in os.listdir(work) if f.startswith(f"callgrind.{name}.{i}."))
            if not dumps or not requests:
                raise RuntimeError(f"{name}: no callgrind dump or no requests")
            total = callgrind_total(os.path.join(work, dumps[0]))
            runs[name].append(total / requests)
            print(f"{name:12s} {total / requests:9.0f} instructions/request ({requests:.0f} requests "
                  f"at {r['rps']:.0f}/s under callgrind, {commit_figures(before, after)}); "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    for name, values in runs.items():
        print(f"MEDIAN {name:12s} {statistics.median(values):9.0f} instructions/request (runs: "
              + ", ".join(f"{v:.0f}" for v in values) + ")")


def tagsets(rig, specs, repeats):
    saved = dict(os.environ)
    start_agent = rig.start_agent
    for i in range(repeats):
        for name, binary, env in specs:
            bench.BIN = binary
            os.environ.update(env)
            # bench_tagsets names its agent "tagsets"; each run gets a directory of its own.
            rig.start_agent = lambda _, *a, n=f"{name}-{i}", **k: start_agent(n, *a, **k)
            r = {}
            try:
                bench.bench_tagsets(rig, r)
            finally:
                rig.start_agent = start_agent
                os.environ.clear()
                os.environ.update(saved)
            print(f"{name:12s} idle {r['idle_rss']:.1f} MB, RSS {r['rss_10k']:.1f} MB, "
                  f"peak {r['hwm_10k']:.1f} MB ({r['tagsets_load']}); load {os.getloadavg()[0]:.2f}",
                  flush=True)


def half(work, rig, specs, rate, seconds, repeats):
    nginx, nginx_addr = bench.start_nginx(work)
    agents = start_agents(rig, specs)
    p99s = {name: [] for name, _, _ in agents}
    for _ in range(repeats):
        probe = bench.FsyncProbe(work)
        ref = bench.loadgen_rate(nginx_addr, SINGLE_BODY, rate, seconds=seconds)
        disk = probe.stop()
        print(f"nginx        p99 {ref['p99_ms']:.2f} ms | disk fsync probe p50 {disk['p50']:.2f} "
              f"p99 {disk['p99']:.2f} max {disk['max']:.1f} ms", flush=True)
        for name, _, addr in agents:
            before = bench.metrics(addr)
            x = bench.loadgen_rate(addr, SINGLE_BODY, rate, seconds=seconds)
            p99s[name].append(x["p99_ms"])
            print(f"{name:12s} {x['rate']:.0f}/s p50 {x['p50_ms']:.2f} p90 {x['p90_ms']:.2f} "
                  f"p99 {x['p99_ms']:.2f} p99.9 {x['p999_ms']:.2f} max {x['max_ms']:.1f} ms, "
                  f"{commit_figures(before, bench.metrics(addr))}, errors {x['errors']:.0f}, "
                  f"non-2xx {x['non2xx']:.0f}", flush=True)
    for name, values in p99s.items():
        print(f"MEDIAN {name:12s} p99 {statistics.median(values):.2f} ms (runs: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("single", "instructions", "tagsets", "half"):
        sys.exit(__doc__)
    mode, args = sys.argv[1], sys.argv[2:]
    try:
        if mode in ("single", "instructions"):
            seconds, repeats, specs = int(args[0]), int(args[1]), parse_specs(args[2:])
        elif mode == "tagsets":
            seconds, repeats, specs = 0, int(args[0]), parse_specs(args[1:])
        else:
            rate, seconds, repeats = int(args[0]), int(args[1]), int(args[2])
            specs = parse_specs(args[3:])
    except (IndexError, ValueError):
        sys.exit(__doc__)
    if not specs:
        sys.exit(__doc__)
    os.makedirs(os.path.join(bench.ROOT, "target"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="ab.", dir=os.path.join(bench.ROOT, "target"))
    try:
        bench.BIN = specs[0][1]
        rig = bench.Rig(work)
        if mode == "single":
            single(work, rig, specs, seconds, repeats)
        elif mode == "instructions":
            instructions(work, rig, specs, seconds, repeats)
        elif mode == "tagsets":
            tagsets(rig, specs, repeats)
        else:
            half(work, rig, specs, rate, seconds, repeats)
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
