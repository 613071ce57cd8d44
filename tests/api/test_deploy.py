"""deploy/ and the Dockerfile stay consistent with the server: metric names, probes, auth."""

from __future__ import annotations

import json
import re

import yaml

from server.metrics import REGISTRY
from tests.api.helpers import DESIGN_FAMILIES, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def _exported_sample_names() -> set[str]:
    return {sample.name for family in REGISTRY.collect() for sample in family.samples} | {
        family.name + suffix for family in REGISTRY.collect()
        for suffix in ("", "_total", "_bucket", "_sum", "_count")
    }


def test_dashboard_uses_only_real_metrics_and_covers_every_family():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:vllm:|loraplex_)[a-z0-9_:]+)", expr)}
    assert used <= _exported_sample_names(), used - _exported_sample_names()
    for family in DESIGN_FAMILIES:
        assert any(name.startswith(family) for name in used), f"no panel shows {family}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_k8s_probes_auth_and_prometheus_annotations():
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / "loraplex.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {item["name"]: item["value"] for item in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["LORAPLEX_AUTH_FILE"].startswith(mounts["keys"] + "/")
    assert any(v.get("secret") for v in pod["spec"]["volumes"] if v["name"] == "keys")
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    timeout = float(env["LORAPLEX_REQUEST_TIMEOUT_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > timeout  # room for the drain


def test_prometheus_config_and_dockerfile():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert all(job["metrics_path"] == "/metrics" for job in config["scrape_configs"] if "metrics_path" in job)
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "LORAPLEX_AUTH_FILE=/etc/loraplex/keys.toml" in dockerfile
    assert 'CMD ["python", "-m", "server", "--host", "0.0.0.0"' in dockerfile
