#!/usr/bin/env python3
"""First attempts a fleet's spread alone leaves throttled: a queueing model, no retries.

N agents, each at a uniform offset in [0, spread), send D calls 1/max_calls_per_second apart
against one account's token bucket (rate and burst a second's worth, as the emulator's
quotas). Prints the share of first attempts that meet an empty bucket, for several seeds.
Usage: bench/fleet_first_attempts.py [agents] [dimensions] [spread_s] [seeds]
"""
import random
import sys

agents = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
dims = int(sys.argv[2]) if len(sys.argv) > 2 else 3
spread = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
seeds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
rate, burst, per_agent = 10.0, 10.0, 2.0

for seed in range(seeds):
    rng = random.Random(seed)
    calls = sorted(
        off + d / per_agent for off in (rng.uniform(0, spread) for _ in range(agents)) for d in range(dims)
    )
    tokens, last, throttled = burst, 0.0, 0
    for t in calls:
        tokens = min(burst, tokens + (t - last) * rate)
        last = t
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            throttled += 1
    print(f"seed {seed}: {agents} x {dims}, spread {spread:.0f} s: first attempts throttled {throttled}/{len(calls)} ({100 * throttled / len(calls):.1f}%)")
