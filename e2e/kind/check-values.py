#!/usr/bin/env python3
"""Renders charts/kube-dsr with e2e/kind/values.yaml and checks it the way
scripts/chart-check.py checks the chart's own value sets: values.schema.json,
`helm lint --strict`, the Kubernetes schemas, the privilege and drift checks.
It imports chart-check.py's functions (Helm's engine through helm-python-sdk),
so it needs the repository's .venv (scripts/setup.sh):

    .venv/bin/python e2e/kind/check-values.py

Runs here without Docker; not part of `make test`.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "e2e" / "kind" / "values.yaml"
RELEASE = NAMESPACE = "kube-dsr"

spec = importlib.util.spec_from_file_location("chart_check", ROOT / "scripts" / "chart-check.py")
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)

values = cc.helm.values_from_yaml(VALUES.read_text())
with cc.helm.Chart.load(cc.CHART) as chart:
    chart.validate_schema(chart.merge_values(values))  # raises on a schema violation
problems = cc.check_lint("kind", values, NAMESPACE) + cc.check_render("kind", values, RELEASE, NAMESPACE)
for o in cc.docs(cc.render(values, RELEASE, NAMESPACE)):
    if o["kind"] in ("Deployment", "DaemonSet"):
        c = o["spec"]["template"]["spec"]["containers"][0]
        print(f"{o['kind']}/{o['metadata']['name']}: {c['image']} ({c['imagePullPolicy']}) {' '.join(c['command'] + c['args'])}")
for p in problems:
    print(f"FAIL: {p}")
print("e2e/kind/values.yaml: " + ("FAILED" if problems else "schema, lint and render checks pass"))
sys.exit(1 if problems else 0)
