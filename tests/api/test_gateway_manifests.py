"""deploy/k8s/gateway as a cluster with the Gateway API Inference Extension admits it: the InferencePool against
the extension's CRD schema (crds/), the endpoint picker's objects against the Kubernetes schemas, and the
references between them, the loraplex Deployment and the picker's EndpointPickerConfig."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.api.helpers import REPO_ROOT, closed_schema

GATEWAY = REPO_ROOT / "deploy" / "k8s" / "gateway"
CRD = GATEWAY / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
LORAPLEX = REPO_ROOT / "deploy" / "k8s" / "loraplex.yaml"
KUBERNETES_VERSION = "1.33.0"  # as tests/api/test_deploy_schema.py
EPP_MOUNT = "/config"


def _objects(path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def _gateway_objects() -> dict[str, dict]:
    return {**_objects(GATEWAY / "inferencepool.yaml"), **_objects(GATEWAY / "epp.yaml")}


def _pool_validator():
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "inference.networking.k8s.io" and crd["spec"]["names"]["kind"] == "InferencePool"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return jsonschema.Draft7Validator(closed_schema(version["schema"]["openAPIV3Schema"]))


def _cel_errors(pool: dict) -> list[str]:
    """The CRD's x-kubernetes-validations (CEL) on spec, which jsonschema does not evaluate, written out."""
    errors = []
    ref = pool["spec"]["endpointPickerRef"]
    if ref.get("kind", "Service") == "Service" and "port" not in ref:
        errors.append("endpointPickerRef: port is required when kind is Service")
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    if len(numbers) != len(set(numbers)):
        errors.append("targetPorts: port numbers must be unique")
    return errors


def test_inference_pool_matches_the_crd_schema():
    pool = _gateway_objects()["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    errors = [e.message for e in _pool_validator().iter_errors(pool)] + _cel_errors(pool)
    assert not errors, errors


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["endpointPickerRef"].update(failureMode="Retry"), "Retry"),
    (lambda s: s.update(targetPorts=[]), "[]"),
    (lambda s: s["targetPorts"].append({"number": 70000}), "70000"),
    (lambda s: s.update(selectr={}), "selectr"),
    (lambda s: s["selector"].update(matchLabels={"app": "not a label value!"}), "not a label value!"),
    (lambda s: s["endpointPickerRef"].pop("port"), "port"),
    (lambda s: s["targetPorts"].append({"number": 8000}), "unique"),
])
def test_the_schema_check_rejects_what_a_cluster_rejects(mutate, needle):
    pool = copy.deepcopy(_gateway_objects()["InferencePool"])
    mutate(pool["spec"])
    errors = [e.message for e in _pool_validator().iter_errors(pool)] + _cel_errors(pool)
    assert any(needle in error for error in errors), errors


def test_epp_objects_match_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = _objects(GATEWAY / "epp.yaml")
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"} <= set(objects)
    for doc in objects.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_http_route_matches_the_gateway_api_crd_schema():
    """The route against Gateway API's HTTPRoute v1 schema (crds/, standard channel); its CEL rules are
    not evaluated (the route uses none of the features they restrict: filters, redirects, rewrites)."""
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load((GATEWAY / "crds" / "gateway.networking.k8s.io_httproutes.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "HTTPRoute"
    (version,) = crd["spec"]["versions"]
    validator = jsonschema.Draft7Validator(closed_schema(version["schema"]["openAPIV3Schema"]))
    route = _gateway_objects()["HTTPRoute"]
    assert list(validator.iter_errors(route)) == []
    broken = copy.deepcopy(route)
    broken["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"  # not an enum value
    broken["spec"]["rules"][0]["timeout"] = "300s"  # misspelt field
    assert len(list(validator.iter_errors(broken))) >= 2


def test_pool_selects_the_loraplex_pods_and_their_port():
    pool = _gateway_objects()["InferencePool"]["spec"]
    deployment = _objects(LORAPLEX)["Deployment"]["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= deployment["metadata"]["labels"].items()
    ports = {p["containerPort"] for c in deployment["spec"]["containers"] for p in c["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [8000] and 8000 in ports


def test_pool_points_at_the_picker_service_and_the_route_at_the_pool():
    objects = _gateway_objects()
    pool, service, deployment = objects["InferencePool"], objects["Service"], objects["Deployment"]
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == service["metadata"]["name"] and ref.get("kind", "Service") == "Service"
    (ext_proc,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    container_ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]
                       ["ports"]}
    assert container_ports[ext_proc["targetPort"]] == 9002
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    route = objects["HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    env = {e["name"]: e.get("value") for e in _objects(LORAPLEX)["Deployment"]["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    timeout = re.fullmatch(r"(\d+)s", rule["timeouts"]["request"])
    assert timeout and int(timeout.group(1)) >= int(env["LORAPLEX_REQUEST_TIMEOUT_S"])


def _epp_config() -> tuple[dict, list[str]]:
    objects = _gateway_objects()
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    config_path = args[args.index("--config-file") + 1]
    assert config_path.startswith(EPP_MOUNT + "/")
    assert {"name": "config", "mountPath": EPP_MOUNT, "readOnly": True} in container["volumeMounts"]
    data = objects["ConfigMap"]["data"]
    return yaml.safe_load(data[config_path.removeprefix(EPP_MOUNT + "/")]), args


def test_picker_config_reads_our_metric_names_and_scores_lora_affinity():
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import REGISTRY

    config, args = _epp_config()
    assert config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    refs = [p["pluginRef"] for p in profile["plugins"]]
    assert set(refs) <= set(plugins) and "lora-affinity-scorer" in refs
    for source in config["data"]["sources"]:
        assert source["pluginRef"] in plugins
        assert all(e["pluginRef"] in plugins for e in source["extractors"])
    assert args[args.index("--pool-name") + 1] == _gateway_objects()["InferencePool"]["metadata"]["name"]

    extractor = plugins["core-metrics-extractor"]["parameters"]
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    specs = {key: engine[key] for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec",
                                          "cacheInfoSpec")}
    assert all(specs.values()), "every protocol metric is read (an empty spec turns one off)"
    from prometheus_client import generate_latest

    exported = {f.name for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}
    for key, spec in specs.items():
        assert spec in exported, f"{key} names {spec!r}, which server/metrics.py does not define"


def test_network_policy_lets_the_picker_scrape_and_metrics_stay_open_to_it():
    loraplex = _objects(LORAPLEX)
    epp_labels = _gateway_objects()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    ingress = loraplex["NetworkPolicy"]["spec"]["ingress"]
    allowed = [peer["podSelector"]["matchLabels"] for rule in ingress for peer in rule["from"]
               if set(peer) == {"podSelector"}]
    assert any(labels.items() <= epp_labels.items() for labels in allowed)
    # The picker sends no credentials: a pool whose pods protect /metrics would be scored blind.
    env = {e["name"] for e in loraplex["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not env & {"LORAPLEX_METRICS_REQUIRE_KEY", "LORAPLEX_METRICS_KEY_SHA256"}
