#!/usr/bin/env bash
# Follows the deployment guides and the listing guide as written (docs/deploy-*.md, docs/listing.md):
#   - every ```sh block runs, in order, one bash script per guide, from the repository root;
#   - every ```console block (commands against AWS) parses with bash -n;
#   - every repository path a guide names exists, and every relative link resolves.
# Needs target/release/meterd (cargo build --release if missing; scripts/container-test.sh builds it).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
check() {
  local name="$1"; shift
  local out="$WORK/out"
  if "$@" >"$out" 2>&1; then
    passed=$((passed + 1)); printf 'ok    %s\n' "$name"
  else
    failed=$((failed + 1)); printf 'FAIL  %s\n' "$name"; sed 's/^/      /' "$out" | tail -40
  fi
}

# Writes the blocks of one info string from a markdown file into a file, one after another.
extract() { # file lang out
  awk -v lang="$2" '
    /^```/ {
      if (inblock) { inblock = 0; print ""; next }
      if (inother) { inother = 0; next }
      info = substr($0, 4); split(info, w, " ")
      if (w[1] == lang) { inblock = 1; printf "# --- %s block at line %d\n", lang, NR } else { inother = 1 }
      next
    }
    inblock { print }
  ' "$1" >"$3"
}

run_sh_blocks() { # doc
  local script="$WORK/$(basename "$1").sh"
  extract "$1" sh "$script.body"
  {
    echo 'set -euo pipefail'
    echo 'cleanup() { local j; for j in $(jobs -p); do kill "$j" 2>/dev/null || true; done; }'
    echo 'trap cleanup EXIT'
    cat "$script.body"
  } >"$script"
  timeout 600 bash -x "$script"
}

# Runnable blocks bind only ports they picked free: a fixed port reaches whatever else holds it.
no_fixed_ports() { # doc
  local body="$WORK/$(basename "$1").ports"
  extract "$1" sh "$body"
  if grep -nE '(127\.0\.0\.1|localhost|\[::1\]):[0-9]+' "$body" | grep -vE ':0([^0-9]|$)'; then
    echo "$1: a runnable block names a fixed loopback port (pick a free one, or port 0)"
    return 1
  fi
}

syntax_console_blocks() { # doc
  local script="$WORK/$(basename "$1").console"
  extract "$1" console "$script"
  bash -n "$script"
}

paths_exist() { # doc
  python3 - "$1" <<'PY'
import pathlib, re, sys
doc = pathlib.Path(sys.argv[1])
text = doc.read_text()
bad = []
# Repository paths (not placeholders such as keys/v<N>.pem, not absolute paths).
for p in sorted(set(re.findall(r"(?<![\w./<>$-])((?:deploy|helm|ecs-task-def|scripts|docs|keys)/[\w./-]*\w)(?![\w<>])", text))):
    if not pathlib.Path(p).exists():
        bad.append(f"missing file: {p}")
for link in sorted(set(re.findall(r"\]\(([^)#:]+)\)", text))):
    if not (doc.parent / link).exists():
        bad.append(f"broken link: {link}")
print("\n".join(bad) or f"{doc}: all paths exist")
sys.exit(1 if bad else 0)
PY
}

# The same build as scripts/container-test.sh's (cargo auditable), so one does not undo the other.
build=(cargo build)
if cargo auditable --version >/dev/null 2>&1; then build=(cargo auditable build); fi
"${build[@]}" --release --locked --quiet || { echo "docs checks: ${build[*]} --release failed"; exit 1; }

for doc in docs/deploy-container.md docs/deploy-eks.md docs/deploy-ecs.md docs/deploy-ec2.md docs/listing.md; do
  check "$doc: files and links exist" paths_exist "$doc"
  check "$doc: console blocks parse" syntax_console_blocks "$doc"
  check "$doc: sh blocks pick free ports" no_fixed_ports "$doc"
  check "$doc: sh blocks run" run_sh_blocks "$doc"
done
# docs/listing.md builds a seller's locked binary into target/release; put the default back.
"${build[@]}" --release --locked --quiet || { echo "docs checks: restoring the default release build failed"; exit 1; }

echo "docs checks: $passed passed, $failed failed"
((failed == 0))
