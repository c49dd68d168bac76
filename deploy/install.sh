#!/bin/sh
# Installs meterd as a systemd service, for AMI builders (Packer, EC2 Image Builder).
#   sudo deploy/install.sh [--binary PATH] [--config PATH] [--prefix DIR] [--no-start]
# Idempotent: an existing /etc/meterd/meterd.toml is kept unless --config is given.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
binary="$here/../target/release/meterd"
config=""
prefix=""
start=1

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; exit 64 ;;
  esac
done

[ -x "$binary" ] || { echo "install.sh: no executable at $binary (cargo build --release first)" >&2; exit 1; }

install -D -m 0755 "$binary" "$prefix/usr/local/bin/meterd"
install -D -m 0644 "$here/systemd/meterd.service" "$prefix/etc/systemd/system/meterd.service"
install -d -m 0755 "$prefix/etc/meterd"
if [ -n "$config" ]; then
  install -m 0644 "$config" "$prefix/etc/meterd/meterd.toml"
elif [ ! -e "$prefix/etc/meterd/meterd.toml" ]; then
  install -m 0644 "$here/systemd/meterd.toml" "$prefix/etc/meterd/meterd.toml"
fi

"$prefix/usr/local/bin/meterd" check-config --config "$prefix/etc/meterd/meterd.toml"

# Only touch the running system when installing into it.
if [ -z "$prefix" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable meterd.service
  if [ "$start" -eq 1 ]; then systemctl restart meterd.service; fi
fi
echo "meterd installed into ${prefix:-/}"
