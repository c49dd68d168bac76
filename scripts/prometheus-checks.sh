#!/usr/bin/env bash
# Prometheus artifacts, checked by the real tool (promtool, from Debian's `prometheus` package):
#   promtool check metrics  on a live agent's /metrics (text format; no warnings allowed)
#   promtool check rules    on helm/meterd/files/prometheus-rules.yaml (the one copy of the alerts)
#   promtool test rules     deploy/prometheus/rules-test.yaml: each alert fires and stays silent
# The agent runs against `meterd emulator`, all on loopback, free ports only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "== apt-get install prometheus (for promtool)"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
RULES=helm/meterd/files/prometheus-rules.yaml
RULE_TESTS=deploy/prometheus/rules-test.yaml

failed=0
step() { echo "== $*"; if ! "$@"; then echo "FAIL: $*"; failed=1; fi; }

step promtool check rules "$RULES"
step promtool test rules "$RULE_TESTS"

source scripts/live-agent.sh
live_agent AKIAPROMTOOL00000001 '"requests", "gigabytes"'
# Labelled families get their series: accepted and rejected usage.
curl -fsS -X POST "$url/v1/usage" -H 'content-type: application/json' \
  -d '{"events":[{"dimension":"requests","quantity":3,"tags":{"tenant":"a"}}]}' >/dev/null
curl -sS -X POST "$url/v1/usage" -H 'content-type: application/json' \
  -d '{"dimension":"nope","quantity":1}' >/dev/null

check_metrics() {
  local out
  curl -fsS "$url/metrics" >"$work/metrics.txt"
  # promtool exits 0 on lint warnings only with some versions: any output is a failure.
  out=$(promtool check metrics <"$work/metrics.txt" 2>&1) || { echo "$out"; return 1; }
  [[ -z "$out" ]] || { echo "$out"; return 1; }
  grep -q '^meterd_aws_calls_total{operation="RegisterUsage",outcome="success"} 1$' "$work/metrics.txt" ||
    { echo "no RegisterUsage call counted"; return 1; }
}
step check_metrics
openmetrics() {
  curl -fsS -H 'Accept: application/openmetrics-text; version=1.0.0' -o "$work/om.txt" \
    -w '%{content_type}\n' "$url/metrics" | grep -q '^application/openmetrics-text' &&
    tail -n1 "$work/om.txt" | grep -qx '# EOF'
}
step openmetrics

exit "$failed"
