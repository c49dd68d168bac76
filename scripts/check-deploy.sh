#!/usr/bin/env bash
# Validates every deploy artifact with the tool its users run. Idempotent; CI runs it.
#   helm lint/template + kubernetes-validate (1.29 and later) + property tests  (helm/meterd)
#   EKS add-on rules: no lookup, random, hooks, .Capabilities, .Release.Service; deterministic
#   botocore RegisterTaskDefinition shape + cfn-lint + property tests          (ecs-task-def/)
#   systemd-analyze verify + property tests                                     (deploy/systemd/)
#   hadolint + arch-dependent paths for amd64 and arm64                         (deploy/Dockerfile)
# Tools are installed by scripts/deploy-tools.sh (.venv-deploy, .cache/deploy-tools).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
eval "$("$ROOT/scripts/deploy-tools.sh")" || { echo "deploy checks: tool install failed" >&2; exit 1; }

CHART=helm/meterd
K8S_VERSIONS=(1.29.0 1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
failures=()
check() {
  local name="$1"; shift
  local out="$WORK/out.$((passed + failed))"
  if "$@" >"$out" 2>&1; then
    passed=$((passed + 1))
    printf 'ok    %s\n' "$name"
  else
    failed=$((failed + 1))
    failures+=("$name")
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$out" | tail -40
  fi
}
# Succeeds when the command fails with a message matching a pattern.
must_fail() {
  local pattern="$1"; shift
  local out
  if out="$("$@" 2>&1)"; then echo "unexpectedly succeeded"; return 1; fi
  grep -q -- "$pattern" <<<"$out" || { echo "$out"; echo "expected: $pattern"; return 1; }
}

meterd_bin() {
  local b
  for b in "$ROOT/target/release/meterd" "$ROOT/target/debug/meterd"; do
    if [[ -x "$b" ]] && "$b" check-config --help >/dev/null 2>&1; then echo "$b"; return 0; fi
  done
  return 1
}

# ---- Helm ----
render() { # name, extra helm args...
  local name="$1"; shift
  rm -rf "$WORK/$name"
  "$HELM" template meterd-ci "$CHART" --namespace seller "$@" --output-dir "$WORK/$name" >/dev/null
}
kv_all() { # render dir
  local v files
  mapfile -t files < <(find "$1" -name '*.yaml' | sort)
  ((${#files[@]})) || { echo "no manifests in $1"; return 1; }
  for v in "${K8S_VERSIONS[@]}"; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${files[@]}" || return 1
  done
}
check "helm lint --strict (defaults)" "$HELM" lint --strict "$CHART"
check "helm lint --strict (ci/example-values.yaml)" "$HELM" lint --strict "$CHART" -f "$CHART/ci/example-values.yaml"
check "helm template (defaults)" render defaults
check "helm template (ci/example-values.yaml)" render example -f "$CHART/ci/example-values.yaml"
check "helm lint --strict (ci/tcp-values.yaml)" "$HELM" lint --strict "$CHART" -f "$CHART/ci/tcp-values.yaml"
check "helm template (ci/tcp-values.yaml)" render tcp -f "$CHART/ci/tcp-values.yaml"
check "helm lint --strict (ci/contract-values.yaml)" "$HELM" lint --strict "$CHART" -f "$CHART/ci/contract-values.yaml"
check "helm template (ci/contract-values.yaml)" render contract -f "$CHART/ci/contract-values.yaml"
for r in defaults example tcp; do
  check "kubernetes-validate --strict ${K8S_VERSIONS[0]}..${K8S_VERSIONS[-1]} ($r)" kv_all "$WORK/$r"
done
check "helm property tests (sidecar, socket or loopback TCP, IRSA, probes, security context)" \
  "$PYTHON" scripts/deploy_tests.py helm "$WORK/defaults" "$WORK/example:$CHART/ci/example-values.yaml" \
  "$WORK/tcp:$CHART/ci/tcp-values.yaml"
notes() {
  "$HELM" install analytics "$CHART" -n seller --dry-run=client -f "$CHART/ci/example-values.yaml" |
    grep -q 'meterd runs as a native sidecar of analytics-meterd'
}
check "helm install --dry-run=client renders NOTES.txt" notes
check "helm refuses a product code off the allow-list" \
  must_fail "allowed-product-codes" "$HELM" template x "$CHART" --set meterd.productCode=prod-free0000
check "helm refuses terminationGracePeriodSeconds <= grace period" \
  must_fail "must exceed" "$HELM" template x "$CHART" --set terminationGracePeriodSeconds=25
check "helm schema rejects unknown meterd values" \
  must_fail "additional properties" "$HELM" template x "$CHART" --set meterd.dimension=requests
check "helm refuses transport tcp without auth.existingSecret" \
  must_fail "needs meterd.auth.existingSecret" "$HELM" template x "$CHART" --set meterd.transport=tcp
check "helm refuses the Unix socket without the pod's fsGroup" \
  must_fail "needs podSecurityContext.fsGroup" "$HELM" template x "$CHART" --set podSecurityContext.fsGroup=null

# The PrometheusRule carries exactly the rules of the plain file (promtool tests that file).
prometheus_rule() {
  "$HELM" lint --strict "$CHART" -f "$CHART/ci/monitoring-values.yaml" >/dev/null &&
    "$HELM" template x "$CHART" -f "$CHART/ci/monitoring-values.yaml" -s templates/prometheusrule.yaml |
    "$PYTHON" -c '
import sys, yaml
doc = yaml.safe_load(sys.stdin)
rules = yaml.safe_load(open(sys.argv[1]))
assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1", doc
assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["metadata"]
assert doc["spec"] == {"groups": rules["groups"]}, "the PrometheusRule differs from the rules file"
' "$CHART/files/prometheus-rules.yaml" &&
    ! "$HELM" template x "$CHART" | grep -q 'kind: PrometheusRule'
}
check "PrometheusRule (monitoring.prometheusRule.enabled) = files/prometheus-rules.yaml; off by default" prometheus_rule
# The PodMonitor scrapes the port meterd serves its metrics on, and only when enabled.
pod_monitor() {
  local out="$WORK/monitoring"
  rm -rf "$out"
  "$HELM" template x "$CHART" -f "$CHART/ci/monitoring-values.yaml" --output-dir "$out" >/dev/null &&
    "$PYTHON" -c '
import sys, tomllib, yaml, pathlib
root = pathlib.Path(sys.argv[1]) / "meterd" / "templates"
pm = yaml.safe_load((root / "podmonitor.yaml").read_text())
dep = yaml.safe_load((root / "deployment.yaml").read_text())
cm = yaml.safe_load((root / "configmap.yaml").read_text())
assert pm["kind"] == "PodMonitor" and pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics", pm
sel = pm["spec"]["selector"]["matchLabels"]
labels = dep["spec"]["template"]["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in sel.items()), (sel, labels)
side = [c for c in dep["spec"]["template"]["spec"]["initContainers"] if c["name"] == "meterd"][0]
assert side["ports"] == [{"name": "metrics", "containerPort": 9377, "protocol": "TCP"}], side.get("ports")
server = tomllib.loads(cm["data"]["meterd.toml"])["server"]
assert server["metrics_listen"] == "0.0.0.0:9377", server
' "$out" && kv_monitoring "$out" &&
    ! "$HELM" template x "$CHART" | grep -q 'kind: PodMonitor'
}
# kubernetes-validate knows no CRDs: validate everything else of the monitoring render.
kv_monitoring() {
  find "$1" -name 'p*monitor*.yaml' -delete -o -name 'prometheusrule.yaml' -delete
  kv_all "$1"
}
check "PodMonitor (monitoring.podMonitor.enabled) scrapes meterd's metrics port; off by default" pod_monitor

# EKS add-on rules, on the raw templates and on two renders of each values file.
addon() { "$PYTHON" scripts/helm_addon_check.py --helm "$HELM" "$@"; }
check "EKS add-on rules; helm template byte-identical across two renders (helm/meterd)" \
  addon "$CHART" -f "$CHART/ci/example-values.yaml" -f "$CHART/ci/tcp-values.yaml" \
  -f "$CHART/ci/monitoring-values.yaml"
# The check itself: a copy of the chart with one forbidden line must fail it.
addon_rejects() { # pattern, template line
  local dir="$WORK/addon-bad"
  rm -rf "$dir"; cp -r "$CHART" "$dir"
  printf '%s\n' "$2" >"$dir/templates/bad.yaml"
  must_fail "$1" addon "$dir"
}
check "EKS add-on check fails on a template that uses lookup" \
  addon_rejects "function lookup" '{{- $s := lookup "v1" "Secret" .Release.Namespace "x" }}'
addon_rejects_each() {
  local bad
  for bad in "randAlphaNum|token: {{ randAlphaNum 8 }}" "uuidv4|id: {{ uuidv4 }}" "now|at: {{ now }}" \
             "Release.Service|by: {{ .Release.Service }}" "Release.Revision|r: {{ .Release.Revision }}" \
             "Capabilities|k: {{ .Capabilities.KubeVersion }}" \
             "helm.sh/hook|  annotations: {helm.sh/hook: pre-install}"; do
    addon_rejects "${bad%%|*}" "${bad#*|}" || { echo "not rejected: ${bad#*|}"; return 1; }
  done
}
check "EKS add-on check fails on randAlphaNum, uuidv4, now, .Release.*, .Capabilities, hooks" addon_rejects_each

seller_chart() { # docs/deploy-eks.md step 7: the named templates inside another chart
  local dir="$WORK/seller"
  rm -rf "$dir"; mkdir -p "$dir"
  cp -r scripts/fixtures/seller-chart "$dir/chart"
  cp "$CHART/templates/_meterd.tpl" "$dir/chart/templates/"
  "$HELM" lint --strict "$dir/chart" &&
    "$HELM" template seller "$dir/chart" --output-dir "$dir/out" >/dev/null &&
    kv_all "$dir/out" &&
    grep -q 'restartPolicy: Always' "$dir/out/seller-app/templates/deployment.yaml" &&
    grep -q 'METERD_SOCKET' "$dir/out/seller-app/templates/deployment.yaml" &&
    addon "$dir/chart"
}
check "meterd.sidecar in a seller's own chart (scripts/fixtures/seller-chart)" seller_chart

# ---- ECS ----
check "ecs task definition vs botocore RegisterTaskDefinition; CFN and IAM consistency" \
  "$PYTHON" scripts/deploy_tests.py ecs
check "cfn-lint ecs-task-def/cloudformation.yaml" "$VENV/bin/cfn-lint" ecs-task-def/cloudformation.yaml

# ---- systemd ----
verify_unit() {
  # ExecStart must name an executable; point it at the built binary or a stub.
  local dir="$WORK/systemd" bin
  mkdir -p "$dir"
  bin="$ROOT/target/release/meterd"
  [[ -x "$bin" ]] || bin="$ROOT/target/debug/meterd"
  if [[ ! -x "$bin" ]]; then bin="$dir/meterd-stub"; printf '#!/bin/sh\n' >"$bin"; chmod +x "$bin"; fi
  sed "s#/usr/local/bin/meterd#$bin#g" deploy/systemd/meterd.service >"$dir/meterd.service"
  SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$dir/meterd.service"
}
check "systemd-analyze verify deploy/systemd/meterd.service" verify_unit
check "systemd unit property tests" "$PYTHON" scripts/deploy_tests.py systemd
install_prefix() {
  local bin p="$WORK/prefix"
  bin="$(meterd_bin)" || { echo "skip: no meterd binary (cargo build first)"; return 0; }
  deploy/install.sh --binary "$bin" --prefix "$p" --no-start &&
    test -x "$p/usr/local/bin/meterd" && test -f "$p/etc/systemd/system/meterd.service" &&
    test -f "$p/etc/meterd/meterd.toml"
}
check "install.sh into a prefix" install_prefix

# ---- every shipped configuration passes the agent's own validation ----
configs_valid() {
  local bin dir="$WORK/configs" f
  bin="$(meterd_bin)" || { echo "skip: no meterd binary (cargo build first)"; return 0; }
  mkdir -p "$dir"
  echo "token-for-check" >"$dir/token"
  sed -e 's/@PRODUCT_CODE@/prod-1234abcd/' -e 's/@PRICING@/hourly+custom/' deploy/container/meterd.toml >"$dir/container.toml"
  cp deploy/systemd/meterd.toml "$dir/systemd.toml"
  for r in defaults example tcp monitoring contract seller/out; do
    "$PYTHON" scripts/deploy_tests.py helm-config "$WORK/$r" "$dir/token" >"$dir/helm-${r%%/*}.toml" || return 1
  done
  for f in "$dir"/*.toml; do
    "$bin" check-config --config "$f" || return 1
  done
  ls "$dir"/helm-*.toml >/dev/null &&
    grep -q '^pricing = "contract"' "$dir/helm-contract.toml" &&
    grep -q '^\[\[contract.entitlements\]\]' "$dir/helm-contract.toml" &&
    ! grep -q '^\[metering\]' "$dir/helm-contract.toml"
}
check "meterd check-config on the image, systemd and rendered Helm configs" configs_valid

# ---- container ----
check "hadolint deploy/Dockerfile" "$HADOLINT" deploy/Dockerfile
check "deploy/Dockerfile and mkrootfs.sh: TARGETARCH-derived paths for amd64 and arm64" \
  "$PYTHON" scripts/deploy_tests.py dockerfile

echo
if ((failed)); then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "deploy checks: $passed passed, $failed failed"
((failed == 0))
