#!/usr/bin/env bash
# One command for the whole benchmark: builds what it needs, runs bench/bench.py, prints the
# results table and writes it to bench/results/<date>.md. See bench/README.md.
#
# Env: SKIP_BUILD=1 uses target/release/meterd as it is; BENCH_REPEATS (3), BENCH_SECONDS (10);
#      BENCH_KEEP=1 keeps the work directory (logs, ledgers) under target/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

missing=()
for tool in wrk nginx redis-server redis-benchmark pgbench psql python3 rustc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "bench: missing ${missing[*]}; on Debian: apt-get install wrk nginx-light redis-server postgresql python3" >&2
  exit 1
fi

if [[ "${SKIP_BUILD:-}" != 1 ]]; then
  # The same build as the container test's and the docs check's (cargo auditable, when
  # installed), so one does not rebuild what another just built.
  build=(cargo build)
  if cargo auditable --version >/dev/null 2>&1; then build=(cargo auditable build); fi
  echo "bench: ${build[*]} --release" >&2
  "${build[@]}" --release --locked --quiet
fi
mkdir -p target/bench
if [[ ! target/bench/loadgen -nt bench/loadgen.rs ]]; then
  rustc --edition 2021 -O bench/loadgen.rs -o target/bench/loadgen
fi
exec python3 bench/bench.py "$@"
