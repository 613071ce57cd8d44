"""/metrics: every family and label named in DESIGN.md is present and moves as requests run; per-adapter
series go with their adapter and are capped; /metrics can require a key."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import (
    BASE_ID,
    DESIGN_FAMILIES,
    ENGINE_MODES,
    api_settings,
    assert_error,
    drop_other_model_series,
    live_server,
    upload,
)


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


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def server(request, tiny_llama_dir, tmp_path_factory):
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"),
                            engine_process=ENGINE_MODES[request.param])
    drop_other_model_series(BASE_ID)  # every vllm: series below must be this server's model
    with live_server(settings) as live:
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


def num_series(client) -> int:
    return sum(1 for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#"))


def adapter_labels(client) -> set[str]:
    samples = scrape(client)["loraplex_adapter_requests"]
    return {s.labels["adapter"] for s in samples}


def test_deleting_an_adapter_removes_its_series(server, tiny_adapters):
    names = [f"gone-{i}" for i in range(12)]
    with server.client() as client:
        before = num_series(client)
        for name in names:
            upload(client, name, tiny_adapters["attn-r4"])
            body = {"model": name, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
            body["prompt"] = "Hello world " * 200  # rejected: a second status series for the adapter
            assert client.post("/v1/completions", json=body).status_code == 400
        assert set(names) <= adapter_labels(client)
        for name in names:
            assert client.delete(f"/v1/adapters/{name}").status_code == 200
        assert not set(names) & adapter_labels(client)
        assert num_series(client) <= before


def test_adapter_labels_are_capped_with_an_other_bucket(server, tiny_adapters, monkeypatch):
    from server import metrics

    assert metrics.adapter_requests.max_adapters == server.state.settings.metrics_max_adapters
    names = [f"capped-{i}" for i in range(5)]
    with server.client() as client:
        named_now = len(adapter_labels(client) - {"base", "other"})
        monkeypatch.setattr(metrics.adapter_requests, "max_adapters", named_now + 2)
        for name in names:
            upload(client, name, tiny_adapters["attn-r4"])
            body = {"model": name, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        labels = adapter_labels(client)
        assert {"capped-0", "capped-1", "other"} <= labels
        assert not {"capped-2", "capped-3", "capped-4"} & labels
        assert client.delete("/v1/adapters/capped-0").status_code == 200  # frees a place under the cap
        body = {"model": "capped-4", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        assert "capped-4" in adapter_labels(client)
        for name in names[1:]:
            assert client.delete(f"/v1/adapters/{name}").status_code == 200


METRICS_KEY, ADMIN_KEY, USER_KEY = "key-prometheus", "key-ops-admin", "key-user"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_metrics_can_require_the_admin_scope_or_the_metrics_key(tiny_llama_dir, tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text("".join(
        f'[[keys]]\nkey_sha256 = "{_sha(key)}"\ntenant = "{tenant}"\nscopes = {scopes}\nadapters = ["*"]\n'
        for key, tenant, scopes in ((ADMIN_KEY, "ops", '["admin"]'), (USER_KEY, "user", '["generate"]'))
    ))
    settings = api_settings(tiny_llama_dir, tmp_path / "store", auth_file=keys_file,
                            metrics_key_sha256=_sha(METRICS_KEY))
    with live_server(settings) as live:
        with live.client() as anonymous:
            assert_error(anonymous.get("/metrics"), 401, "/metrics needs a key")
            assert anonymous.get("/health").status_code == 200
        with live.client(USER_KEY) as user:
            assert_error(user.get("/metrics"), 403, "admin")
        with live.client("not-a-key") as stranger:
            assert_error(stranger.get("/metrics"), 401, "invalid")
        for key in (ADMIN_KEY, METRICS_KEY):
            with live.client(key) as reader:
                assert reader.get("/metrics").status_code == 200
        with live.client(METRICS_KEY) as prometheus:
            assert_error(prometheus.get("/v1/models"), 401)  # the metrics key opens /metrics only


def test_metrics_require_key_needs_some_key_to_check(tiny_llama_dir, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="metrics_require_key needs"):
        api_settings(tiny_llama_dir, tmp_path, metrics_require_key=True)


# vLLM's families that dashboards and routers read, beyond DESIGN.md's: parser name -> (labels, buckets).
# Buckets None: not a histogram; "1-2-5": vLLM's ladder 1, 2, 5, 10, ... up to max_model_len (256 here).
_PHASE = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
          960.0, 1920.0, 7680.0)
VLLM_FAMILIES = {
    "vllm:num_preemptions": ({"model_name"}, None),
    "vllm:iteration_tokens_total": ({"model_name"}, (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                                     16384)),
    "vllm:request_prompt_tokens": ({"model_name"}, "1-2-5"),
    "vllm:request_generation_tokens": ({"model_name"}, "1-2-5"),
    "vllm:request_params_n": ({"model_name"}, (1, 2, 5, 10, 20)),
    "vllm:request_params_max_tokens": ({"model_name"}, "1-2-5"),
    "vllm:request_inference_time_seconds": ({"model_name"}, _PHASE),
    "vllm:request_prefill_time_seconds": ({"model_name"}, _PHASE),
    "vllm:request_decode_time_seconds": ({"model_name"}, _PHASE),
    "vllm:prefix_cache_queries": ({"model_name"}, None),
    "vllm:prefix_cache_hits": ({"model_name"}, None),
    "vllm:cache_config_info": ({"block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks"}, None),
}


def test_vllm_families_have_vllms_names_labels_and_buckets_and_no_created_series(server):
    with server.client() as client:
        text = client.get("/metrics").text
        families = scrape(client)
    assert "_created" not in text
    for name, (labels, buckets) in VLLM_FAMILIES.items():
        assert families.get(name), f"{name} missing from /metrics"
        assert all(labels <= set(s.labels) for s in families[name]), name
        if buckets is None:
            continue
        expected = (1, 2, 5, 10, 20, 50, 100, 200) if buckets == "1-2-5" else buckets
        bounds = [s.labels["le"] for s in families[name] if s.name.endswith("_bucket")]
        assert bounds == [*(str(float(b)) for b in expected), "+Inf"], (name, bounds)
    info = families["vllm:cache_config_info"][0]
    assert info.value == 1 and info.labels["enable_prefix_caching"] == "True"
    assert "vllm:num_preemptions_total" in text and "vllm:prefix_cache_hits_total" in text


def test_vllm_request_families_move(server):
    body = {"model": BASE_ID, "prompt": "Hello world", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    with server.client() as client:
        before = scrape(client)
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
        after = scrape(client)

    def delta(name, sample):
        return value(after, name, sample) - value(before, name, sample)

    for name in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_n",
                 "vllm:request_params_max_tokens", "vllm:request_inference_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds"):
        assert delta(name, f"{name}_count") == 1, name
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 5
    assert delta("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum") == 5
    assert delta("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") >= prompt_tokens + 4
    assert delta("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == prompt_tokens


def test_prefix_cache_queries_and_hits(server):
    """The second identical long prompt reuses the first one's full KV blocks."""
    body = {"model": BASE_ID, "prompt": "Hello world! " * 20, "max_tokens": 2, "temperature": 0}
    hits = []
    with server.client() as client:
        for _ in range(2):
            before = scrape(client)
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200
            after = scrape(client)
            hits.append(value(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
                        - value(before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"))
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 32
    assert hits[0] in (0, hits[1])
    assert hits[1] == (prompt_tokens - 1) // 16 * 16  # every full block but the one holding the last token


def test_preemptions_are_counted(tiny_llama_dir):
    from server import metrics
    from server.engine.request import Request, SamplingParams
    from tests.unit.engine_helpers import make_engine

    engine = make_engine(tiny_llama_dir, kv_cache_blocks=10)  # cannot hold five ~47-token sequences at once
    labels = {"model_name": engine.model_name}
    before = metrics.REGISTRY.get_sample_value("vllm:num_preemptions_total", labels) or 0
    for prompt in ([5, 17, 33, 100, 7] * 3, [44, 55, 66] * 5, [200, 201] * 8, [1, 2, 3] * 5, [9, 8] * 7):
        engine.add_request(Request(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    assert metrics.REGISTRY.get_sample_value("vllm:num_preemptions_total", labels) > before
