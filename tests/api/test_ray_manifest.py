"""deploy/ray/rayservice.yaml as the KubeRay operator admits it: against the RayService v1 CRD schema
(deploy/ray/crds/, vendored), and pointing at the application deploy/ray/app.py really defines."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.api.helpers import REPO_ROOT, closed_schema

RAY = REPO_ROOT / "deploy" / "ray"


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load((RAY / "crds" / "ray.io_rayservices.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft7Validator(closed_schema(version["schema"]["openAPIV3Schema"]))


def _rayservice() -> dict:
    docs = yaml.safe_load_all((RAY / "rayservice.yaml").read_text())
    (service,) = [d for d in docs if d and d["kind"] == "RayService"]
    return service


def test_rayservice_matches_the_kuberay_crd_schema():
    validator = _validator()
    service = _rayservice()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(service)]
    assert errors == []
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 2  # no such field on the head group
    assert list(validator.iter_errors(broken))


def test_serve_config_imports_the_app_builder():
    service = _rayservice()
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    module, attribute = app["import_path"].split(":")
    source = (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert f"def {attribute}(" in source
