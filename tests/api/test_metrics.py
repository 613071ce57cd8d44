"""/metrics: every family and label named in DESIGN.md is present and moves as requests run."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import BASE_ID, DESIGN_FAMILIES, api_settings, live_server, upload


def scrape(client) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(families, name: str, sample_name: str | None = None, **labels) -> float:
    """Sum of the samples of `name` (or its `sample_name` series) whose labels include `labels`."""
    samples = families[name]
    target = sample_name or name
    return sum(s.value for s in samples
               if s.name == target and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with live_server(api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"))) as live:
        yield live


def test_every_design_family_and_label_is_exported_from_the_start(server):
    with server.client() as client:
        families = scrape(client)
    for name, labels in DESIGN_FAMILIES.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name], f"{name} has no samples"
        for sample in families[name]:
            if sample.name.endswith("_created"):
                continue
            assert labels <= set(sample.labels), f"{name} lacks labels {labels - set(sample.labels)}"
            if name.startswith("vllm:"):
                assert sample.labels["model_name"] == BASE_ID
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"]}
    assert {"stop", "length", "abort"} <= reasons
    assert {s.labels["tier"] for s in families["loraplex_adapters_resident"]} >= {"disk", "cpu", "gpu"}


def test_metrics_move_as_requests_run(server, tiny_adapters):
    with server.client() as client:
        before = scrape(client)
        upload(client, "metered", tiny_adapters["attn-r4"])
        for model in ("metered", BASE_ID):
            body = {"model": model, "prompt": "Hello world", "max_tokens": 6, "ignore_eos": True,
                    "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        too_long = {"model": BASE_ID, "prompt": "Hello world " * 200}
        assert client.post("/v1/completions", json=too_long).status_code == 400
        after = scrape(client)

    def grew(name, sample=None, by=1.0, **labels):
        delta = value(after, name, sample, **labels) - value(before, name, sample, **labels)
        assert delta >= by, f"{name}{labels} moved by {delta}, expected at least {by}"

    grew("vllm:generation_tokens", "vllm:generation_tokens_total", by=12)
    grew("vllm:prompt_tokens", "vllm:prompt_tokens_total", by=2)
    grew("vllm:request_success", "vllm:request_success_total", by=2, finished_reason="length")
    grew("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count", by=2)
    grew("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count", by=2)
    grew("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count", by=10)
    grew("vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_count", by=2)
    grew("loraplex_batch_distinct_adapters", "loraplex_batch_distinct_adapters_count", by=2)
    grew("loraplex_adapter_requests", "loraplex_adapter_requests_total", adapter="metered", status="ok")
    grew("loraplex_adapter_requests", "loraplex_adapter_requests_total", adapter="base", status="rejected")
    grew("loraplex_adapter_swaps", "loraplex_adapter_swaps_total", mode="unmerged")
    grew("loraplex_adapter_load_seconds", "loraplex_adapter_load_seconds_count", tier="cpu")
    assert value(after, "loraplex_adapters_resident", tier="disk") == 1
    assert value(after, "loraplex_adapters_resident", tier="cpu") >= 1


def test_gauges_settle_when_idle(server):
    with server.client() as client:
        body = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        families = scrape(client)
    assert value(families, "vllm:num_requests_running") == 0
    assert value(families, "loraplex_adapters_resident", tier="gpu") >= 1
