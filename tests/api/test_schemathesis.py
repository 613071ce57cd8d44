"""Property-based fuzzing of every operation in the OpenAPI spec: no input may cause a 5xx."""

from __future__ import annotations

import contextlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.api.helpers import api_settings, live_server

MAX_EXAMPLES = 10


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir, tmp_path_factory):
    # A short context bounds how long any fuzzed generation can run.
    settings_ = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), max_model_len=32,
                             max_upload_bytes=64_000, request_timeout_s=10)
    with live_server(settings_) as live:
        yield live


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def _label(operation) -> str:
    return f"{operation.method.upper()} {operation.path}"


def _fuzzer(operation, mode: GenerationMode, base_url: str, tried: dict[str, int]):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call(base_url=base_url, timeout=30)
        key = (_label(operation), mode.value)
        tried[key] = tried.get(key, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])

    return fuzz


def test_no_operation_returns_5xx(fuzz_server):
    schema = schemathesis.openapi.from_dict(fuzz_server.app.openapi())
    operations = _operations(schema)
    assert len(operations) >= 13
    tried: dict[tuple[str, str], int] = {}
    for operation in operations:
        _fuzzer(operation, GenerationMode.POSITIVE, fuzz_server.url, tried)()
        with contextlib.suppress(Unsatisfiable):  # an operation without parameters has nothing to break
            _fuzzer(operation, GenerationMode.NEGATIVE, fuzz_server.url, tried)()
    assert {label for label, _ in tried} == {_label(op) for op in operations}
    assert sum(mode == "negative" for _, mode in tried) >= 10
    with fuzz_server.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
