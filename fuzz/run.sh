#!/usr/bin/env bash
# Fuzz meterd's outside-input parsers with cargo-fuzz (libFuzzer).
#   fuzz/run.sh [SECONDS [TARGET...]]   runs each target (default: all) for SECONDS (default
#                           600), one after the other, then merges what was found into the
#                           committed corpus.
# Needs `cargo install cargo-fuzz`; the toolchain is stable, so RUSTC_BOOTSTRAP=1 unlocks the
# nightly flags (-Zsanitizer=address) that cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_TARGET="${1:-600}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(ingest_parse jwt_verify emulator_request)
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in "${TARGETS[@]}"; do
  scratch="fuzz/target/scratch-corpus/$target"
  mkdir -p "$scratch" "fuzz/corpus/$target"
  echo "== $target: ${SECONDS_PER_TARGET}s"
  cargo fuzz run "$target" "$scratch" "fuzz/corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=1024 -timeout=10 -print_final_stats=1
  # Keep the committed corpus minimal: only inputs that add coverage.
  merged="fuzz/target/merged-corpus/$target"
  rm -rf "$merged" && mkdir -p "$merged"
  # Edge coverage only (no hit counts), which keeps a few hundred small files per target.
  cargo fuzz run "$target" -- -merge=1 -use_counters=0 -use_value_profile=0 \
    "$merged" "fuzz/corpus/$target" "$scratch"
  rm -rf "fuzz/corpus/$target" && mv "$merged" "fuzz/corpus/$target"
  echo "== $target: $(ls "fuzz/corpus/$target" | wc -l) corpus entries"
done
