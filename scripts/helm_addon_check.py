#!/usr/bin/env python3
"""Checks a Helm chart against the Amazon EKS add-on rules. Run by scripts/check-deploy.sh.

    python3 scripts/helm_addon_check.py --helm HELM CHART [-f VALUES]...

EKS add-on validation rejects charts whose rendering depends on the cluster, the release's
history or chance. This fails on any of, in the raw templates (comments excepted):
  - lookup;
  - random or time-dependent functions: randAlphaNum, randAlpha, randNumeric, randAscii,
    randInt, randBytes, uuidv4, shuffle, now, date, dateInZone, dateModify, htmlDate,
    htmlDateInZone, unixEpoch, ago, genPrivateKey, genCA, genSelfSignedCert, genSignedCert,
    encryptAES (random IV);
  - .Release.Service, .Release.IsInstall, .Release.IsUpgrade, .Release.Revision (only
    .Release.Name and .Release.Namespace are allowed);
  - .Capabilities;
  - helm.sh/hook annotations;
and, in Chart.yaml, a dependency that is not vendored under charts/. Then it renders the chart
twice with each set of values (`helm template`) and fails unless the two outputs are
byte-identical and carry no helm.sh/hook annotation.
"""

import argparse
import pathlib
import re
import subprocess
import sys

import yaml

FORBIDDEN_FUNCS = [
    "lookup", "randAlphaNum", "randAlpha", "randNumeric", "randAscii", "randInt", "randBytes",
    "uuidv4", "shuffle", "now", "date", "dateInZone", "dateModify", "mustDateModify", "htmlDate",
    "htmlDateInZone", "unixEpoch", "ago", "genPrivateKey", "genCA", "genCAWithKey",
    "genSelfSignedCert", "genSelfSignedCertWithKey", "genSignedCert", "genSignedCertWithKey",
    "encryptAES",
]
# A function name in a template action: not part of a field (.date), a variable ($now) or a
# longer identifier, and not a quoted string.
FUNC_RE = re.compile(r"(?<![\w.$\"'])(" + "|".join(sorted(FORBIDDEN_FUNCS, key=len, reverse=True)) + r")(?![\w])")
RELEASE_RE = re.compile(r"\.Release\.(Service|IsInstall|IsUpgrade|Revision)\b")
CAPABILITIES_RE = re.compile(r"\.Capabilities\b")
HOOK_RE = re.compile(r"helm\.sh/hook")
ACTION_RE = re.compile(r"\{\{(.*?)\}\}", re.S)
COMMENT_RE = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.S)
STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"|`[^`]*`')


def template_problems(chart: pathlib.Path) -> list[str]:
    problems = []
    for f in sorted((chart / "templates").rglob("*")):
        if not f.is_file():
            continue
        text = COMMENT_RE.sub(lambda m: "\n" * m.group(0).count("\n"), f.read_text())
        rel = f.relative_to(chart)
        for m in ACTION_RE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            code = STRING_RE.sub('""', m.group(1))
            for rx, what in ((FUNC_RE, "function"), (RELEASE_RE, "field"), (CAPABILITIES_RE, "object")):
                for hit in rx.finditer(code):
                    problems.append(f"{rel}:{line}: {what} {hit.group(0)} is not allowed in an EKS add-on")
        for i, line in enumerate(text.splitlines(), 1):
            if HOOK_RE.search(line):
                problems.append(f"{rel}:{i}: helm.sh/hook annotations (hooks) are not allowed in an EKS add-on")
    meta = yaml.safe_load((chart / "Chart.yaml").read_text()) or {}
    for dep in meta.get("dependencies") or []:
        name, version = dep.get("name", "?"), dep.get("version", "?")
        vendored = (chart / "charts" / name).is_dir() or any((chart / "charts").glob(f"{name}-*.tgz"))
        if not vendored:
            problems.append(f"Chart.yaml: dependency {name} {version} is not vendored under charts/")
    return problems


def render_problems(helm: str, chart: pathlib.Path, values: list[str]) -> list[str]:
    problems = []
    for v in [None] + values:
        cmd = [helm, "template", "addon-check", str(chart), "--namespace", "addon-check"]
        if v:
            cmd += ["-f", v]
        label = v or "defaults"
        outs = []
        for _ in range(2):
            r = subprocess.run(cmd, capture_output=True)
            if r.returncode:
                problems.append(f"helm template ({label}) failed: {r.stderr.decode().strip()}")
                break
            outs.append(r.stdout)
        if len(outs) < 2:
            continue
        if outs[0] != outs[1]:
            problems.append(f"helm template ({label}): two renders differ (non-deterministic output)")
        for doc in yaml.safe_load_all(outs[0]):
            ann = ((doc or {}).get("metadata") or {}).get("annotations") or {}
            for key in ann:
                if key.startswith("helm.sh/hook"):
                    problems.append(f"rendered ({label}): {doc['kind']}/{doc['metadata']['name']} has {key}")
        print(f"rendered twice, byte-identical ({label}): {len(outs[0])} bytes")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--helm", default="helm")
    ap.add_argument("chart", type=pathlib.Path)
    ap.add_argument("-f", "--values", action="append", default=[])
    args = ap.parse_args()
    problems = template_problems(args.chart) + render_problems(args.helm, args.chart, args.values)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"EKS add-on rules ({args.chart}): {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
