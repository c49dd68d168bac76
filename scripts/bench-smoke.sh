#!/usr/bin/env bash
# The benchmark harness end to end at its smallest size (1 run of 1 s per row, no image build):
# fails if any row of bench/run.sh's table can no longer be produced. The figures of so short a
# run mean nothing; targets are judged only by full runs of bench/run.sh (docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
# postgresql brings the server (initdb, postgres) and the client (psql, pgbench).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v pgbench >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
  echo "bench-smoke: apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

out=target/bench-smoke.md
rm -f "$out"
BENCH_SECONDS=1 BENCH_REPEATS=1 BENCH_IMAGE=0 BENCH_OUT="$out" bench/run.sh >/dev/null
python3 - "$out" <<'PY'
import sys
text = open(sys.argv[1]).read().split("<details>")[0]
rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith(("| what", "| system", "| ---"))]
problems = []
# 17 rows in the targets table, 4 in the peers table (nginx, Redis, PostgreSQL, meterd).
if len(rows) != 21:
    problems.append(f"expected 21 rows, found {len(rows)}")
for row in rows:
    if "nan" in row.lower().replace("n/a: skipped", ""):
        problems.append(f"a figure is missing: {row}")
if problems:
    sys.exit("bench-smoke: " + "; ".join(problems) + "\n" + text)
print(f"bench-smoke: all {len(rows)} rows produced ({sys.argv[1]})")
PY
