#!/usr/bin/env bash
# Runs tests/python (boto3, the AWS CLI, PyJWT and, through tests/js, the AWS SDK for
# JavaScript v3 against `meterd emulator`) in .venv.
# Creates .venv when missing and installs the pinned clients from tests/python/requirements.txt
# and tests/js/package-lock.json (npm ci, from the npm registry).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
(cd tests/js && npm ci --silent --no-audit --no-fund)
cargo build --quiet --bin meterd
METERD_BIN="${METERD_BIN:-$ROOT/target/debug/meterd}" exec .venv/bin/python -m pytest -q tests/python "$@"
