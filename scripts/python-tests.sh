#!/usr/bin/env bash
# Runs tests/python (boto3, the AWS CLI, PyJWT and, through tests/js and tests/go, the AWS SDKs
# for JavaScript v3 and Go v1/v2 against `meterd emulator`) in .venv.
# Creates .venv when missing and installs the pinned clients from tests/python/requirements.txt
# and tests/js/package-lock.json (npm ci, from the npm registry).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The Go SDKs come from Debian (GOPATH mode, offline): tests/python/test_compat.py builds tests/go.
# node runs tests/js.
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
missing=()
for pkg in golang-go golang-github-aws-aws-sdk-go-dev golang-github-aws-aws-sdk-go-v2-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v npm >/dev/null || missing+=(nodejs npm)
if ((${#missing[@]})); then
  echo "python-tests: apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
(cd tests/js && npm ci --silent --no-audit --no-fund)
cargo build --quiet --bin meterd
METERD_BIN="${METERD_BIN:-$ROOT/target/debug/meterd}" exec .venv/bin/python -m pytest -q tests/python "$@"
