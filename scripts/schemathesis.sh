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
cargo build --locked --bin meterd
BIN=target/debug/meterd

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The demo product with the unique dimension `users` besides requests and gigabytes.
cat >"$work/emulator.toml" <<TOML
region = "us-east-1"
[[products]]
code = "prod-demo1234"
dimensions = ["requests", "gigabytes", "users"]
[[keys]]
version = 1
private_key_path = "$PWD/src/emulator/demo-signing-key.pem"
TOML
"$BIN" emulator --listen 127.0.0.1:0 --addr-file "$work/emulator.url" --config "$work/emulator.toml" \
  --public-key-out "$work/emulator-v1.pem" >"$work/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/emulator.url" ] && [ -s "$work/emulator-v1.pem" ] && break; sleep 0.1; done
endpoint=$(cat "$work/emulator.url")
port=$(free_port)
token="schemathesis-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$token" >"$work/token"
cat >"$work/meterd.toml" <<TOML
product_code = "prod-demo1234"
pricing = "hourly+custom"
platform = "ecs"
[metering]
dimensions = ["requests", "gigabytes", "users"]
tag_keys = ["tenant"]
aggregation = { users = "unique" }
[registration]
public_key_files = ["$work/emulator-v1.pem"]
[server]
listen = "127.0.0.1:$port"
auth_token_file = "$work/token"
[state]
dir = "$work/state"
[aws]
region = "us-east-1"
endpoint_url = "$endpoint"
TOML
AWS_ACCESS_KEY_ID=AKIASCHEMATHESIS0001 AWS_SECRET_ACCESS_KEY=secret AWS_EC2_METADATA_DISABLED=true \
  METERD_LOG=warn "$BIN" run --config "$work/meterd.toml" >"$work/agent.log" 2>&1 &
agent=$!
pids+=($agent)
for _ in $(seq 200); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/agent.log"; exit 1; }

# A schema-valid request may still be refused by state: 422 when it would take a dimension past
# the service's per-hour maximum (generated quantities reach 2147483647 quickly), or a unique
# dimension past its distinct values per hour.
cat >"$work/schemathesis.toml" <<TOML
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "422", "5xx"]
TOML

echo "== schemathesis against http://127.0.0.1:$port (max $MAX_EXAMPLES examples per operation)"
set +e
.venv-schemathesis/bin/schemathesis --config-file "$work/schemathesis.toml" run docs/openapi.yaml \
  --url "http://127.0.0.1:$port" \
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
