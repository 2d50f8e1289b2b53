"""deploy/ stays in step with the code: its files parse, and every metric it queries exists."""

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    # Helm templates are Go templates; their renders are checked (test_helm_chart, deploy-check).
    files = [f for f in files if "templates" not in f.parts]
    assert len(files) >= 6
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path


def test_k8s_gateway_probes_point_at_real_routes(gateway):
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "cascade.yaml").read_text()))
    deployment = next(
        d
        for d in docs
        if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("gateway")
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    with gateway() as (client, _):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            path = container[probe]["httpGet"]["path"]
            assert client.get(path).status_code == 200, (probe, path)


def test_dashboards_and_rules_query_metrics_the_gateway_exports(gateway):
    with gateway() as (client, _):
        families = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    texts = [(DEPLOY / "prometheus" / "rules.yml").read_text()]
    dashboard = json.loads((DEPLOY / "grafana" / "cascade.json").read_text())
    texts += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    adapter = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    texts += [r["seriesQuery"] for r in adapter["rules"]["custom"]]
    used = set()
    for text in texts:
        used |= set(re.findall(r"\bcascade_[a-z_]+", text))
        for name in re.findall(r"\bcascade:[a-z0-9_:]+", text):
            assert name in recorded, f"{name} is used but never recorded"
    assert used
    for name in used:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert base in families, f"{name} is queried but not exported"
