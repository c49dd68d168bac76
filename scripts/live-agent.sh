# Sourced by scripts that check a live agent: `meterd emulator` and `meterd run` on loopback,
# free ports only, both stopped (and the work directory removed) when the script exits.
#
#   source scripts/live-agent.sh
#   live_agent ACCESS_KEY DIMENSIONS [METERING_LINES] [SERVER_LINES]
#
# DIMENSIONS is a TOML list (`"requests", "gigabytes"`), for the emulator's demo product and
# the agent's `[metering]`. Afterwards: $BIN, $work, $url (the agent's base URL), $agent (its
# pid); the logs are $work/emulator.log and $work/agent.log.

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

live_agent() {
  local access_key="$1" dimensions="$2" metering="${3:-}" server="${4:-}" port
  cat >"$work/emulator.toml" <<TOML
region = "us-east-1"
[[products]]
code = "prod-demo1234"
dimensions = [$dimensions]
[[keys]]
version = 1
private_key_path = "$PWD/src/emulator/demo-signing-key.pem"
TOML
  "$BIN" emulator --listen 127.0.0.1:0 --addr-file "$work/emulator.url" --config "$work/emulator.toml" \
    --public-key-out "$work/emulator-v1.pem" >"$work/emulator.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/emulator.url" ] && [ -s "$work/emulator-v1.pem" ] && break; sleep 0.1; done
  [ -s "$work/emulator.url" ] || { echo "the emulator did not start:"; cat "$work/emulator.log"; return 1; }
  port=$(free_port)
  cat >"$work/meterd.toml" <<TOML
product_code = "prod-demo1234"
pricing = "hourly+custom"
platform = "ecs"
[metering]
dimensions = [$dimensions]
tag_keys = ["tenant"]
$metering
[registration]
public_key_files = ["$work/emulator-v1.pem"]
[server]
listen = "127.0.0.1:$port"
$server
[state]
dir = "$work/state"
[aws]
region = "us-east-1"
endpoint_url = "$(cat "$work/emulator.url")"
TOML
  AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY=secret AWS_EC2_METADATA_DISABLED=true \
    METERD_LOG=warn "$BIN" run --config "$work/meterd.toml" >"$work/agent.log" 2>&1 &
  agent=$!
  pids+=($agent)
  url="http://127.0.0.1:$port"
  for _ in $(seq 200); do curl -fsS "$url/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "$url/readyz" >/dev/null || { cat "$work/agent.log"; return 1; }
}
