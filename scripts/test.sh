#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs every test.
#   Rust: unit, property and integration tests (emulator, entitlement, agent, real binary).
#   Python: boto3, the AWS CLI and PyJWT against `meterd emulator` (in .venv).
# Set METERD_CRASH_ITERATIONS for a longer kill -9 loop (default 20).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --locked --bin meterd
cargo test --locked --no-fail-fast
scripts/python-tests.sh
