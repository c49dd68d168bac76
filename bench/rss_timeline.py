#!/usr/bin/env python3
"""Where in bench.py's "RSS with 10,000 tag sets" row the agent's memory peaks.

    python3 bench/rss_timeline.py BINARY [VAR=VALUE ...]

Runs the row (`bench_tagsets`: preload, tags10k.lua, tags10k_batch.lua, then one
`GET /v1/usage/current` of the 10,000 rows) against one agent, sampling its /proc every 50 ms,
and prints each step of VmRSS of more than 1.5 MB with VmHWM, the thread count and the
anonymous and file-backed shares (smaps_rollup), the load phases marked. Then three more
`GET /v1/usage/current`, each with RSS and peak after it. A diagnosis, not a figure of the
table: the sampling reads /proc while the agent runs. VAR=VALUE pairs go into the agent's
environment.
"""

import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def sample(pid):
    status = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        status[key] = value.split()
    rollup = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            rollup[parts[0][:-1]] = int(parts[1])
    anon = rollup.get("Anonymous", 0)
    return (int(status["VmRSS"][0]), int(status["VmHWM"][0]), int(status["Threads"][0]), anon,
            rollup.get("Rss", 0) - anon)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bench.BIN = os.path.abspath(sys.argv[1])
    os.environ.update(dict(kv.split("=", 1) for kv in sys.argv[2:]))
    os.makedirs(os.path.join(bench.ROOT, "target"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="rss.", dir=os.path.join(bench.ROOT, "target"))
    samples, done = [], threading.Event()

    def sampler(pid):
        t0 = time.monotonic()
        while not done.is_set():
            try:
                samples.append((time.monotonic() - t0, *sample(pid)))
            except OSError:
                return
            time.sleep(0.05)

    try:
        rig = bench.Rig(work)
        start_agent, wrk = rig.start_agent, bench.wrk
        agent = {}

        def start(name, *a, **k):
            p, addr = start_agent(name, *a, **k)
            agent.update(proc=p, addr=addr)
            threading.Thread(target=sampler, args=(p.pid,), daemon=True).start()
            return p, addr

        def marked_wrk(url, script, *a, **k):
            samples.append(os.path.basename(script))
            return wrk(url, script, *a, **k)

        rig.start_agent, bench.wrk = start, marked_wrk
        # bench_tagsets stops its agent at the end: keep it for the GETs after.
        stop, bench.stop = bench.stop, lambda p, *a, **k: None
        r = {}
        try:
            bench.bench_tagsets(rig, r)
        finally:
            bench.wrk, bench.stop = wrk, stop
        done.set()
        last = None
        for s in samples:
            if isinstance(s, str):
                print(f"--- {s}")
                continue
            t, rss, hwm, threads, anon, file_backed = s
            if last is None or abs(rss - last) > 1536 or s is samples[-1]:
                print(f"{t:6.2f} s  RSS {rss / 1024:5.1f} MB  peak {hwm / 1024:5.1f} MB  "
                      f"threads {threads}  anon {anon / 1024:5.1f} MB  file {file_backed / 1024:5.1f} MB")
                last = rss
        print(f"row: RSS {r['rss_10k']:.1f} MB, peak {r['hwm_10k']:.1f} MB ({r['tagsets_load']})")
        for i in range(3):
            status, body = bench.http("GET", f"http://{agent['addr']}/v1/usage/current")
            rss, hwm = bench.rss_mb(agent["proc"].pid)
            print(f"GET /v1/usage/current {status} ({len(body):,} bytes): RSS {rss:.1f} MB, peak {hwm:.1f} MB")
        stop(agent["proc"])
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
