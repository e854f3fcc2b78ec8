"""Offline checks of the alignx chart with the Helm 4 Go SDK (helm-python-sdk) and
kubernetes-validate; no cluster, no `helm` binary. Run by tests/tests/chart.rs:

    python check.py OUT_DIR

Lints and renders the chart for each values file (defaults, every feature on, the CPU/HPA
variant), validates every rendered manifest against the Kubernetes schemas, checks that
each case of bad-values.yaml is refused, and writes OUT_DIR/report.json, the rendered
manifests (OUT_DIR/<case>.yaml, and as a JSON list OUT_DIR/<case>.json) and the alert
rules at default thresholds (OUT_DIR/alerts.rules.yaml) for promtool. Exit status 0 only when every check passed.
"""

import json
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.dirname(HERE)
# The newest Kubernetes release kubernetes-validate knows.
KUBE_VERSION = kubernetes_validate.utils.all_versions()[-1]
CASES = {
    "default": None,
    "gpu-keda": "values-gpu-keda.yaml",
    "cpu-hpa": "values-cpu-hpa.yaml",
}
# Kinds served by operators' CRDs; kubernetes-validate has no schema for them, so they
# get a structural check here (the alert rules also go through promtool).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


def load_values(name):
    if name is None:
        return {}
    with open(os.path.join(HERE, name)) as f:
        return yaml.safe_load(f) or {}


def render(chart, values):
    chart.validate_schema(values)
    return chart.render(values, name="alignx", namespace="alignx", is_install=True)


def check_case(chart, case, values_file, out, report):
    values = load_values(values_file)
    lint = helm.lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSION)
    problems = [m for m in lint["messages"] if m["severity"] >= 2] + [
        {"error": e} for e in lint["errors"]
    ]
    manifests = render(chart, values)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    objects = []
    for path, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        entry = {"template": os.path.basename(path), "kind": doc["kind"], "name": doc["metadata"]["name"]}
        if key in CRD_KINDS:
            missing = [f for f in ("metadata", "spec") if f not in doc]
            entry["validated"] = "structure (CRD)"
            if missing:
                problems.append({"error": f"{path}: {doc['kind']} without {missing}"})
        else:
            try:
                version = kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                entry["validated"] = f"kubernetes {version} (strict)"
            except (kubernetes_validate.ValidationError, kubernetes_validate.utils.SchemaNotFoundError) as e:
                problems.append({"error": f"{path}: {doc['kind']}: {getattr(e, 'message', e)}"})
        objects.append(entry)
    with open(os.path.join(out, f"{case}.yaml"), "w") as f:
        f.write("---\n" + "---\n".join(yaml.safe_dump(d, sort_keys=False) for _, d in docs))
    with open(os.path.join(out, f"{case}.json"), "w") as f:
        json.dump([d for _, d in docs], f)
    report["cases"][case] = {
        "values": values_file or "values.yaml",
        "lint_messages": lint["messages"],
        "objects": objects,
        "problems": problems,
    }
    return not problems


def check_bad(chart, report):
    with open(os.path.join(HERE, "bad-values.yaml")) as f:
        cases = yaml.safe_load(f)
    ok = True
    for case in cases:
        try:
            render(chart, case["values"])
            outcome = {"name": case["name"], "refused": False}
        except helm.HelmError as e:
            message = str(e)
            outcome = {"name": case["name"], "refused": True, "error": message[:400]}
            if "error" in case and case["error"] not in message:
                outcome["refused_for_another_reason"] = True
        good = outcome["refused"] and not outcome.get("refused_for_another_reason")
        ok &= good
        report["bad_values"].append(outcome)
    return ok


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    chart = helm.Chart.load(CHART)
    report = {
        "helm_sdk": helm.helm_sdk_version(),
        "kubernetes": KUBE_VERSION,
        "cases": {},
        "bad_values": [],
    }
    ok = True
    for case, values_file in CASES.items():
        ok &= check_case(chart, case, values_file, out, report)
    # The alert rules at their default thresholds, for promtool's unit tests.
    rules_values = {"prometheusRule": {"enabled": True}}
    doc = yaml.safe_load(render(chart, rules_values)["alignx/templates/prometheusrule.yaml"])
    with open(os.path.join(out, "alerts.rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": doc["spec"]["groups"]}, f, sort_keys=False)
    ok &= check_bad(chart, report)
    report["ok"] = bool(ok)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
