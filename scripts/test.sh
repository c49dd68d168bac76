#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs every suite.
#   rust        unit, property and integration tests (emulator, entitlement, agent, real binary)
#   python      boto3 (3 retry modes), the AWS CLI, PyJWT and the JS SDK v3 against `meterd emulator`
#   notify      systemd READY=1 from the real binary on a NOTIFY_SOCKET
#   baked       a locked-down build (product code, pricing, platform baked in) refuses every
#               entitlement bypass with exit 78; the unbaked build still allows them
#   api         schemathesis: generated requests against the live agent, checked against docs/openapi.yaml
#   reliability the oracle suite, short mode: kill -9 across hours, faults, clock jumps, full disk (root)
#   prometheus  promtool: check metrics on a live agent, check and test the alert rules
#   deploy      Helm, kubernetes-validate, ECS/botocore, cfn-lint, systemd-analyze, hadolint
#   container   podman image build + sidecar test (needs root; skipped otherwise)
#   docs        the deployment guides followed as written (after the container test's release build)
#   bench       the benchmark harness end to end at its smallest size (every row produced; no targets)
# Every suite runs; the last line counts them. METERD_CRASH_ITERATIONS lengthens the kill loop.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

passed=0
failed=0
failures=()
suite() {
  local name="$1"; shift
  echo "== $name: $*"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name")
  fi
}

suite build cargo build --locked --bin meterd
suite rust cargo test --locked --no-fail-fast
suite python scripts/python-tests.sh
suite notify python3 scripts/systemd-notify-test.py target/debug/meterd
suite baked python3 scripts/baked_test.py target/debug/meterd
suite api scripts/schemathesis.sh
suite prometheus scripts/prometheus-checks.sh
suite deploy scripts/check-deploy.sh
if [ "$(id -u)" -eq 0 ]; then
  suite reliability scripts/reliability.sh
  suite container scripts/container-test.sh
  suite docs scripts/check-docs.sh
  suite bench scripts/bench-smoke.sh
else
  echo "== reliability, container, docs, bench: skipped (need root for tmpfs, podman and apt); run scripts/reliability.sh, scripts/container-test.sh, scripts/check-docs.sh and scripts/bench-smoke.sh as root"
fi

[ "${#failures[@]}" -eq 0 ] || echo "failed suites: ${failures[*]}"
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
