#!/usr/bin/env bash
# The reliability suite (tests/reliability.rs): an oracle compares every acknowledged count
# with what the Metering Service emulator billed, under kill -9, faults, clock jumps, a full
# disk and concurrent retries, and a fleet of 50 real processes sharing one account's quotas
# (issue 16; docs/PERFORMANCE.md). See docs/RELIABILITY.md.
#
#   scripts/reliability.sh          short mode (CI): 20 kills, 8 simulated fault hours
#   scripts/reliability.sh --long   long mode (releases): 200 kills, 24 simulated fault hours
#
# Needs libfaketime (installed here with apt-get when missing) and root for the tmpfs of the
# full-disk test. Prints one `RELIABILITY scenario=...` line of figures per scenario.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=short
case "${1:-}" in
  "") ;;
  --long) mode=long ;;
  *) echo "usage: $0 [--long]" >&2; exit 64 ;;
esac
if [ "$mode" = long ]; then
  export METERD_RELIABILITY_KILLS="${METERD_RELIABILITY_KILLS:-200}"
  export METERD_RELIABILITY_HOURS="${METERD_RELIABILITY_HOURS:-24}"
  export METERD_RELIABILITY_CLIENTS="${METERD_RELIABILITY_CLIENTS:-16}"
else
  export METERD_RELIABILITY_KILLS="${METERD_RELIABILITY_KILLS:-20}"
  export METERD_RELIABILITY_HOURS="${METERD_RELIABILITY_HOURS:-8}"
  export METERD_RELIABILITY_CLIENTS="${METERD_RELIABILITY_CLIENTS:-8}"
fi

if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
  echo "== installing libfaketime"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime libfaketime >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime libfaketime >/dev/null
  fi
fi

echo "== reliability suite, $mode mode (kills=$METERD_RELIABILITY_KILLS hours=$METERD_RELIABILITY_HOURS clients=$METERD_RELIABILITY_CLIENTS)"
start=$(date +%s)
# One test at a time: the kill loop and the fault run are timing-sensitive on 2 cores.
mkdir -p target
set +e
cargo test --locked --test reliability -- --ignored --test-threads=1 --nocapture \
  >"target/reliability-$mode.log" 2>&1
rc=$?
set -e
grep -E '^(RELIABILITY|test |running|test result)|panicked' "target/reliability-$mode.log" || true
if [ "$rc" -ne 0 ]; then
  echo "== failures (last 80 lines of the log):"
  tail -n 80 "target/reliability-$mode.log"
fi
echo "== reliability suite, $mode mode: exit $rc in $(( $(date +%s) - start ))s (full log: target/reliability-$mode.log)"
exit "$rc"
