#!/usr/bin/env bash
# Real container test: builds deploy/Dockerfile with podman and runs meterd as a sidecar.
#
#   1. base image debian:bookworm-slim made locally with debootstrap + podman import (cached);
#      the Dockerfile's rootfs stage takes the runtime's Debian packages and their dpkg
#      metadata from it (distroless layout: /var/lib/dpkg/status.d);
#   2. cargo auditable build --release on the host twice: the production binary without the
#      emulator (--no-default-features, as the Dockerfile's from-source stage builds it) into
#      target/production/meterd, and the default build (with the emulator) that runs the
#      emulator container; the image is built from the production binary with
#      --target runtime-prebuilt, its files exported and checked (os-release, every file
#      owned by a package entry or meterd's own, libraries, the .dep-v0 section, no emulator
#      in the binary), its SBOM written (target/meterd-image.cdx.json) and checked, its size
#      printed;
#   3. the same for linux/arm64 when target/aarch64-unknown-linux-gnu/release/meterd exists
#      (ARM64=1 cross-builds it first): built and checked, not run (no emulation here);
#   4. emulator container (network: loopback only; the image with the default build mounted
#      over it), meterd sidecar joined to its network namespace, containers posting usage
#      with `meterd report` over the sidecar's Unix socket (mode 0660: a container with the
#      socket's group gets in, one without is refused) and over TCP; the production sidecar
#      answers 404 on /_emulator/ and has no `emulator` command;
#   5. SIGTERM to the sidecar; the emulator must hold the MeterUsage records.
#
# Env: METERD_IMAGE (default localhost/meterd:test), KEEP=1 keeps containers for debugging,
#      SKIP_CARGO_BUILD=1 uses target/production/meterd and target/release/meterd as they are,
#      ARM64=1 cross-builds arm64.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMAGE="${METERD_IMAGE:-localhost/meterd:test}"
BASE_IMAGE="docker.io/library/debian:bookworm-slim"
SUITE_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
CARGO_AUDITABLE_VERSION=0.7.7
ARM64_TARGET=aarch64-unknown-linux-gnu
EMU_PORT=18377
AGENT_ADDR=127.0.0.1:8377
MAX_IMAGE_BYTES=$((40 * 1000 * 1000))
RUN_ID="meterd-ct-$$"

start=$(date +%s)
log() { printf 'container-test [%3ss]: %s\n' "$(($(date +%s) - start))" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi

# ---- 0. tools ----
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v nsenter >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" uidmap fuse-overlayfs >/dev/null
fi

if ! cargo auditable --version >/dev/null 2>&1; then
  log "cargo install cargo-auditable@$CARGO_AUDITABLE_VERSION"
  cargo install --locked --quiet "cargo-auditable@$CARGO_AUDITABLE_VERSION"
fi

eval "$("$ROOT/scripts/deploy-tools.sh")"
log "hadolint deploy/Dockerfile"
"$HADOLINT" deploy/Dockerfile || fail "hadolint"

# ---- 1. base image (cached in podman's store) ----
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  log "debootstrap bookworm (minbase) for $BASE_IMAGE"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  $SUDO debootstrap --variant=minbase bookworm "$work/rootfs" "$SUITE_MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
  $SUDO rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/*.bin \
    "$work"/rootfs/var/cache/apt/archives/*.deb
  $SUDO tar -C "$work/rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  $SUDO rm -rf "$work"
  trap - EXIT
fi

# ---- 2. binary and image ----
PROD_BIN=target/production/meterd
if [[ "${SKIP_CARGO_BUILD:-}" != 1 ]]; then
  log "cargo auditable build --release --locked --no-default-features (production, no emulator)"
  cargo auditable build --release --locked --quiet --no-default-features
  install -D -m 0755 target/release/meterd "$PROD_BIN"
  # Last, so target/release/meterd is the default build the other suites run.
  log "cargo auditable build --release --locked (with the emulator)"
  cargo auditable build --release --locked --quiet
fi
[[ -x "$PROD_BIN" ]] || fail "$PROD_BIN missing"
[[ -x target/release/meterd ]] || fail "target/release/meterd missing"
# The check that the production binary carries no emulator must see one in the default build.
"$PYTHON" scripts/deploy_tests.py no-emulator "$PROD_BIN" || fail "the production binary carries the emulator"
if "$PYTHON" scripts/deploy_tests.py no-emulator target/release/meterd 2>"$ROOT/target/no-emulator.log"; then
  fail "the emulator check found nothing in the default build"
fi
grep -q "PRIVATE KEY" "$ROOT/target/no-emulator.log" || { cat "$ROOT/target/no-emulator.log" >&2; fail "the default build's key not named"; }
log "production binary: no private key, no /_emulator/ (the default build has both)"

build_image() { # tag, arch, binary, log
  # podman 4.3 cannot resolve `FROM --platform=$BUILDPLATFORM` against a local image when
  # --platform names another architecture, so arm64 gets TARGETARCH as a build argument
  # (the rootfs stage runs natively either way; buildx sets the image's platform itself).
  "${PODMAN[@]}" build --pull=never --format docker --network=host "${LIMITS[@]}" \
    --build-arg TARGETARCH="$2" --build-arg METERD_BINARY="$3" \
    --build-arg METERD_PRODUCT_CODE=prod-demo1234 \
    --build-arg METERD_REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --target runtime-prebuilt -t "$1" -f deploy/Dockerfile . >"$4" 2>&1 \
    || { tail -30 "$4"; fail "podman build $2 (log: $4)"; }
}
check_image_files() { # tag, arch
  local tar="$ROOT/target/meterd-image-$2.tar" sbom="$ROOT/target/meterd-image-$2.cdx.json" c
  c=$("${PODMAN[@]}" create "$1" 2>/dev/null)
  "${PODMAN[@]}" export "$c" >"$tar"
  "${PODMAN[@]}" rm "$c" >/dev/null 2>&1
  "$PYTHON" scripts/sbom.py "$tar" -o "$sbom" || fail "sbom $2"
  "$PYTHON" scripts/deploy_tests.py image "$tar" "$sbom" "$2" \
    || fail "image files ($2): os-release, package entries, libraries, cargo auditable, SBOM"
  log "image files ($2): every file accounted for; SBOM $sbom"
  # The check itself: the same files plus one library no package owns must fail it.
  if [[ "$2" == amd64 ]]; then
    "$PYTHON" - "$tar" "$tar.stray" <<'PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1]) as src, tarfile.open(sys.argv[2], "w") as dst:
    for m in src:
        dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    data = b"\x7fELF stray"
    info = tarfile.TarInfo("usr/lib/libstray.so.1")
    info.size = len(data)
    dst.addfile(info, io.BytesIO(data))
PY
    if "$PYTHON" scripts/deploy_tests.py image "$tar.stray" "$sbom" "$2" >"$tar.stray.log" 2>&1; then
      fail "the image check passed an image with a file no package owns"
    fi
    grep -q 'usr/lib/libstray.so.1' "$tar.stray.log" || { cat "$tar.stray.log" >&2; fail "stray file not named"; }
    log "image files: a stray library is caught"
    rm -f "$tar.stray" "$tar.stray.log"
  fi
  rm -f "$tar"
}

log "podman build --target runtime-prebuilt -t $IMAGE (amd64)"
build_image "$IMAGE" amd64 "$PROD_BIN" "$ROOT/target/container-test-build.log"

size=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')
log "image size: $size bytes ($(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1e6 }') MB; binary $(stat -c %s "$PROD_BIN") bytes)"
((size <= MAX_IMAGE_BYTES)) || fail "image is $size bytes, over 40 MB"
check_image_files "$IMAGE" amd64
cp "$ROOT/target/meterd-image-amd64.cdx.json" "$ROOT/target/meterd-image.cdx.json"

arm_bin="target/$ARM64_TARGET/release/meterd"
if [[ "${ARM64:-}" == 1 ]]; then
  log "cargo auditable build --release --locked --target $ARM64_TARGET"
  command -v aarch64-linux-gnu-gcc >/dev/null || {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
  }
  rustup target add "$ARM64_TARGET" >/dev/null
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    cargo auditable build --release --locked --quiet --no-default-features --target "$ARM64_TARGET"
fi
if [[ -x "$arm_bin" ]]; then
  log "podman build --target runtime-prebuilt (arm64, $arm_bin)"
  build_image "$IMAGE-arm64" arm64 "$arm_bin" "$ROOT/target/container-test-build-arm64.log"
  arm_size=$("${PODMAN[@]}" image inspect "$IMAGE-arm64" --format '{{.Size}}')
  log "image size (arm64): $arm_size bytes"
  check_image_files "$IMAGE-arm64" arm64
  if command -v qemu-aarch64-static >/dev/null; then
    # No binfmt here to run arm64 containers; qemu-user runs the binary against the image's
    # own loader and libraries instead (-L: the exported image as the root).
    arm_root="$(mktemp -d)"
    c=$("${PODMAN[@]}" create "$IMAGE-arm64" 2>/dev/null)
    "${PODMAN[@]}" export "$c" | tar -C "$arm_root" -x
    "${PODMAN[@]}" rm "$c" >/dev/null 2>&1
    qemu-aarch64-static -L "$arm_root" "$arm_root/usr/local/bin/meterd" check-config \
      --config "$arm_root/etc/meterd/meterd.toml" >&2 || fail "arm64 meterd under qemu-user"
    rm -rf "$arm_root"
    log "arm64: meterd check-config ran under qemu-aarch64-static with the image's libraries"
  else
    log "arm64: not run (qemu-user-static not installed)"
  fi
else
  log "arm64: skipped ($arm_bin missing; ARM64=1 cross-builds it)"
fi

# ---- 3. run: emulator + sidecar + client in one network namespace ----
shared="$(mktemp -d)"
chmod 0777 "$shared"
cleanup() {
  if [[ "${KEEP:-}" != 1 ]]; then
    # Containers joined to the emulator's namespace go first: podman refuses to remove it before.
    "${PODMAN[@]}" rm -f -i -t 0 "$RUN_ID-client" >/dev/null 2>&1 || true
    "${PODMAN[@]}" rm -f -i -t 0 "$RUN_ID-sidecar" >/dev/null 2>&1 || true
    "${PODMAN[@]}" rm -f -i -t 0 "$RUN_ID-emulator" >/dev/null 2>&1 || true
    rm -rf "$shared"
  fi
}
dump_logs() {
  for c in emulator sidecar; do
    echo "---- logs: $c ----" >&2
    "${PODMAN[@]}" logs "$RUN_ID-$c" 2>&1 | tail -40 >&2 || true
  done
}
trap 'rc=$?; if ((rc)); then dump_logs; fi; cleanup; exit $rc' EXIT

cat >"$shared/meterd.toml" <<EOF
product_code = "prod-demo1234"
pricing = "hourly+custom"
platform = "ecs"

[metering]
dimensions = ["requests", "gigabytes"]
tag_keys = ["tenant"]
report_zero = true
max_allocations = 500

[registration]
public_key_version = 1
public_key_files = ["/shared/emulator.pem"]

[server]
listen = "$AGENT_ADDR"
unix_socket = "/shared/run/meterd.sock"
auth_token_file = ""
grace_period = "20s"

[state]
dir = "/var/lib/meterd"

[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:$EMU_PORT"
EOF
chmod 0644 "$shared/meterd.toml"
# The socket's directory, as Kubernetes makes an emptyDir with the pod's fsGroup (10001):
# group-owned, setgid. meterd creates the socket mode 0660.
mkdir "$shared/run"
chown 0:10001 "$shared/run"
chmod 2770 "$shared/run"

# Podman warns that it cannot add health-check timers without systemd; the test runs the
# image's HEALTHCHECK itself with `podman healthcheck run`.
quiet_systemd() {
  local rc=0
  "$@" 2>"$shared/podman.err" </dev/null || rc=$?
  grep -v 'unable to get systemd connection' "$shared/podman.err" >&2 || true
  return "$rc"
}
RUN=(quiet_systemd "${PODMAN[@]}" run "${LIMITS[@]}" --read-only --cap-drop=ALL --security-opt no-new-privileges
  -v "$shared:/shared:z" -e METERD_CONFIG=/shared/meterd.toml)
AWS_ENV=(-e AWS_ACCESS_KEY_ID=AKIDMETERDTEST -e AWS_SECRET_ACCESS_KEY=meterd-test-secret
  -e AWS_EC2_METADATA_DISABLED=true)

log "starting emulator (loopback-only network namespace)"
"${RUN[@]}" -d --name "$RUN_ID-emulator" --network=none --no-healthcheck \
  -v "$ROOT/target/release/meterd:/opt/meterd-dev/meterd:ro" --entrypoint /opt/meterd-dev/meterd "$IMAGE" \
  emulator --listen "127.0.0.1:$EMU_PORT" --public-key-out /shared/emulator.pem >/dev/null
for _ in $(seq 1 100); do [[ -s "$shared/emulator.pem" ]] && break; sleep 0.1; done
[[ -s "$shared/emulator.pem" ]] || fail "emulator wrote no public key"

emu_pid=$("${PODMAN[@]}" inspect -f '{{.State.Pid}}' "$RUN_ID-emulator")
in_netns() { $SUDO nsenter -t "$emu_pid" -n "$@"; }

log "starting meterd sidecar in the emulator's network namespace"
"${RUN[@]}" -d --name "$RUN_ID-sidecar" --network="container:$RUN_ID-emulator" \
  --health-interval=disable "${AWS_ENV[@]}" "$IMAGE" >/dev/null

ready=0
for _ in $(seq 1 60); do
  if "${PODMAN[@]}" healthcheck run "$RUN_ID-sidecar" >/dev/null 2>&1; then ready=1; break; fi
  [[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$RUN_ID-sidecar")" == true ]] || fail "sidecar exited"
  sleep 0.5
done
((ready)) || fail "sidecar never became healthy (HEALTHCHECK meterd health)"
log "sidecar healthy (image HEALTHCHECK passed)"

sock_mode=$(stat -c '%a %g' "$shared/run/meterd.sock")
[[ "$sock_mode" == "660 10001" ]] || fail "socket is mode/group $sock_mode, want 660 10001"
log "posting usage over the Unix socket from containers with the socket's group (uid 10002)"
CLIENT=("${RUN[@]}" --rm --name "$RUN_ID-client" --network=none --no-healthcheck)
"${CLIENT[@]}" --user 10002:10002 --group-add 10001 "$IMAGE" report --dimension requests --quantity 3 >/dev/null \
  || fail "meterd report over the Unix socket"
"${CLIENT[@]}" --user 10002:10002 --group-add 10001 "$IMAGE" report --dimension gigabytes --quantity 2 >/dev/null \
  || fail "meterd report over the Unix socket"
log "a container without the socket's group is refused"
if out=$("${CLIENT[@]}" --user 10003:10003 "$IMAGE" report --dimension requests --quantity 100 2>&1); then
  fail "uid 10003 without group 10001 posted usage through the 0660 socket"
fi
grep -qi 'permission denied' <<<"$out" || fail "uid 10003 refused for another reason: $out"
log "posting usage over TCP (127.0.0.1) from the shared network namespace"
in_netns python3 - "$AGENT_ADDR" <<'PY' || fail "POST /v1/usage"
import json, sys, urllib.request
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/usage", method="POST",
    data=json.dumps({"dimension": "requests", "quantity": 4}).encode(),
    headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=5) as r:
    assert 200 <= r.status < 300, r.status
PY

log "the production sidecar serves no /_emulator/ and has no emulator command"
in_netns python3 - "$AGENT_ADDR" <<'PY' || fail "/_emulator/ on the sidecar"
import sys, urllib.error, urllib.request
for path in ("/_emulator/records", "/_emulator/calls", "/_emulator/faults"):
    try:
        with urllib.request.urlopen(f"http://{sys.argv[1]}{path}", timeout=5) as r:
            raise SystemExit(f"{path}: {r.status}, want 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404, f"{path}: {e.code}, want 404"
PY
if out=$("${CLIENT[@]}" "$IMAGE" emulator --listen 127.0.0.1:0 2>&1); then
  fail "the production image ran \`meterd emulator\`"
fi
grep -q "emulator" <<<"$out" || fail "meterd emulator refused for another reason: $out"

log "SIGTERM to the sidecar"
t0=$(date +%s)
"${PODMAN[@]}" kill --signal TERM "$RUN_ID-sidecar" >/dev/null
code=$("${PODMAN[@]}" wait "$RUN_ID-sidecar")
log "sidecar exited with $code after $(($(date +%s) - t0))s"
[[ "$code" == 0 ]] || fail "sidecar exit code $code"

log "checking the emulator's records"
in_netns python3 - "127.0.0.1:$EMU_PORT" <<'PY' || fail "emulator records"
import json, sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}/_emulator/records", timeout=5) as r:
    body = json.load(r)
records = body.get("records", body) if isinstance(body, dict) else body

def field(rec, *names):
    for n in names:
        if n in rec:
            return rec[n]
    return None

totals = {}
for rec in records:
    dim = field(rec, "UsageDimension", "usage_dimension", "dimension")
    qty = field(rec, "UsageQuantity", "usage_quantity", "quantity") or 0
    code = field(rec, "ProductCode", "product_code")
    assert code in (None, "prod-demo1234"), f"unexpected product code {code}"
    totals[dim] = totals.get(dim, 0) + int(qty)
print(f"emulator records: {len(records)}, totals {totals}", file=sys.stderr)
assert totals.get("requests") == 7, totals
assert totals.get("gigabytes") == 2, totals
PY

log "PASS"
echo "container test: 1 passed, 0 failed"
