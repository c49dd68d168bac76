#!/usr/bin/env bash
# HTTP API conformance: schemathesis generates requests from docs/openapi.yaml and checks the
# live agent's answers (no 5xx, status codes, content types, headers and bodies as
# documented, auth enforced). The agent runs against `meterd emulator`, all on loopback.
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]   (default 1000 per operation)
#
# schemathesis comes from PyPI into .venv-schemathesis (gitignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MAX_EXAMPLES="${1:-1000}"

if [ ! -x .venv-schemathesis/bin/schemathesis ]; then
  echo "== installing schemathesis into .venv-schemathesis"
  python3 -m venv .venv-schemathesis
  .venv-schemathesis/bin/pip install -q 'schemathesis>=4,<5'
fi
source scripts/live-agent.sh
token="schemathesis-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$token" >"$work/token"
# The demo product with the unique dimension `users` besides requests and gigabytes.
live_agent AKIASCHEMATHESIS0001 '"requests", "gigabytes", "users"' \
  'aggregation = { users = "unique" }' "auth_token_file = \"$work/token\""

# A schema-valid request may still be refused by state: 422 when it would take a dimension past
# the service's per-hour maximum (generated quantities reach 2147483647 quickly), or a unique
# dimension past its distinct values per hour.
cat >"$work/schemathesis.toml" <<TOML
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "422", "5xx"]
TOML

echo "== schemathesis against $url (max $MAX_EXAMPLES examples per operation)"
set +e
.venv-schemathesis/bin/schemathesis --config-file "$work/schemathesis.toml" run docs/openapi.yaml \
  --url "$url" \
  -H "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$MAX_EXAMPLES" \
  --seed 6 \
  --report junit --report-junit-path target/schemathesis-junit.xml \
  --no-color
rc=$?
set -e
if ! kill -0 "$agent" 2>/dev/null; then
  echo "the agent died during the run:"; cat "$work/agent.log"; exit 1
fi
if grep -qiE 'panicked|ERROR' "$work/agent.log"; then
  echo "the agent logged errors:"; grep -iE 'panicked|ERROR' "$work/agent.log" | head -20
fi
exit "$rc"
