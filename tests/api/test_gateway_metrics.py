"""Model-server protocol conformance: /metrics gives the Gateway API Inference Extension's endpoint picker what
it reads (docs/proposals/003-model-server-protocol of the extension), with the types and formats its metrics
extractor and LoRA-affinity scorer parse, while requests over several adapters run and wait.

The picker reads, per pod and per scrape of the Prometheus text format:
- vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc: gauges (fraction 0..1);
  with several series it takes the first one, so there must be exactly one per model;
- vllm:lora_requests_info: a gauge whose value is the update time, the series with the largest value wins;
  labels max_lora (an integer), running_lora_adapters and waiting_lora_adapters (comma-separated names that
  are matched against the request's `model`);
- vllm:cache_config_info (optional): labels block_size and num_gpu_blocks, integers.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import BASE_ID, api_settings, drop_other_model_series, live_server, upload

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")  # the picker parses with legacy name validation
CLASSIC_SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{| )")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
LORA_LABELS = {"model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"}
QUEUE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
MAX_SLOTS = 1  # with max_rank 8, the pool holds one rank-4 adapter: the others wait for its room
SECONDS_PER_STEP = 0.04
ADMIN_KEY, ACME_KEY, BETA_KEY = "key-gw-admin", "key-gw-acme", "key-gw-beta"
RUNNING, WAITING = "acme-run", ("beta-wait", "acme-wait")


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    """Two tenants with their own adapter globs; /metrics left open, as the picker needs it (it sends no key)."""
    root = tmp_path_factory.mktemp("gateway")
    keys = root / "keys.toml"
    keys.write_text("".join(
        f'[[keys]]\nkey_sha256 = "{_sha(key)}"\ntenant = "{tenant}"\nscopes = {scopes}\nadapters = ["{glob}"]\n'
        for key, tenant, scopes, glob in ((ADMIN_KEY, "ops", '["admin", "generate"]', "*"),
                                          (ACME_KEY, "acme", '["generate"]', "acme-*"),
                                          (BETA_KEY, "beta", '["generate"]', "beta-*"))
    ))
    settings = api_settings(tiny_llama_dir, root / "store", auth_file=keys, max_slots=MAX_SLOTS,
                            max_rank=8)
    drop_other_model_series(BASE_ID)  # a real server has one model; the protocol checks count series
    with live_server(settings) as live:
        with live.client(ADMIN_KEY) as admin:
            for name in (RUNNING, *WAITING):
                upload(admin, name, tiny_adapters["attn-r4"])
        yield live


def scrape(live, key: str | None = None) -> dict:
    with live.client(key) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    # The picker ignores the content type and parses the body with expfmt's classic text parser (legacy name
    # validation): every sample line must start with an unquoted name, which text format 1.0.0 (what
    # prometheus_client announces) keeps for names that are valid in the classic format.
    assert response.headers["content-type"].startswith("text/plain")
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            assert CLASSIC_SAMPLE.match(line), line
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def only_series(families: dict, name: str):
    """The one sample of a protocol gauge for our model (a second series would make the picker's pick arbitrary)."""
    family = families[name]
    assert family.type == "gauge", f"{name} is a {family.type}; the protocol says gauge"
    samples = [s for s in family.samples if s.name == name]
    assert len(samples) == 1, f"{name} has {len(samples)} series: {samples}"
    assert samples[0].labels["model_name"] == BASE_ID
    return samples[0]


def adapter_list(value: str) -> list[str]:
    """A label value as the picker splits it: on commas, items trimmed, empty items dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def lora_info(families: dict, updated_after: float, scraped_before: float, max_lora: int = MAX_SLOTS):
    """The vllm:lora_requests_info series, checked for type, labels and value format; returns the sample."""
    sample = only_series(families, "vllm:lora_requests_info")
    assert set(sample.labels) == LORA_LABELS
    assert re.fullmatch(r"[0-9]+", sample.labels["max_lora"]), "max_lora must parse with strconv.Atoi"
    assert int(sample.labels["max_lora"]) == max_lora
    # The value is the update time: Unix seconds (not ms), not later than the scrape.
    assert max(1.6e9, updated_after) < sample.value <= scraped_before + 1, sample.value
    for key in ("running_lora_adapters", "waiting_lora_adapters"):
        value = sample.labels[key]
        names = adapter_list(value)
        assert value == ",".join(names), f"{key}={value!r}: no spaces or empty items"
        assert len(names) == len(set(names)), f"{key}={value!r} repeats a name"
        assert all(ADAPTER_NAME.match(n) for n in names), value
        assert BASE_ID not in names, "the base model is no adapter"
    return sample


def affinity_score(sample, adapter: str) -> float:
    """The LoRA-affinity scorer's documented rule for one pod: 1.0 running, 0.8 a free slot, 0.6 waiting, else 0."""
    running = set(adapter_list(sample.labels["running_lora_adapters"]))
    waiting = set(adapter_list(sample.labels["waiting_lora_adapters"]))
    if adapter in running:
        return 1.0
    if len(running) + len(waiting) < int(sample.labels["max_lora"]):
        return 0.8
    return 0.6 if adapter in waiting else 0.0


def check_format(families: dict) -> None:
    for name, family in families.items():
        assert METRIC_NAME.match(name), name
        for sample in family.samples:
            assert all(LABEL_NAME.match(label) for label in sample.labels), sample


def wait_for(live, condition, timeout_s: float = 20.0):
    """Scrape until condition(families) holds; returns (families, time before, time after that scrape)."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = time.time()
        families = scrape(live)
        after = time.time()
        if condition(families):
            return families, before, after
        assert time.monotonic() < deadline, "the metrics never reached the expected state"
        time.sleep(0.02)


def _labels(families) -> dict[str, str]:
    return [s for s in families["vllm:lora_requests_info"].samples][-1].labels


@pytest.fixture()
def slow_engine(server):
    """Every engine step takes SECONDS_PER_STEP longer, so requests stay running or waiting while we scrape."""
    engine = server.state.engine.engine
    step = engine.step

    def slow_step():
        time.sleep(SECONDS_PER_STEP)
        return step()

    engine.step = slow_step
    yield
    del engine.step


def _complete(live, key: str, model: str, max_tokens: int) -> int:
    body = {"model": model, "prompt": "Hello world", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    with live.client(key, timeout=120) as client:
        return client.post("/v1/completions", json=body).status_code


def test_protocol_metrics_while_adapters_run_and_wait(server, slow_engine):
    started = time.time()
    with ThreadPoolExecutor(max_workers=8) as pool:
        first = [pool.submit(_complete, server, ACME_KEY, RUNNING, 60) for _ in range(2)]
        first.append(pool.submit(_complete, server, ACME_KEY, BASE_ID, 60))
        # The running adapter holds the only slot before the others arrive.
        wait_for(server, lambda f: _labels(f)["running_lora_adapters"] == RUNNING
                 and only_series(f, "vllm:num_requests_running").value >= 3)
        later = [pool.submit(_complete, server, key, name, 8) for key, name in ((BETA_KEY, WAITING[0]),
                                                                                 (ACME_KEY, WAITING[1]))]
        families, before, after = wait_for(
            server, lambda f: set(WAITING) <= set(adapter_list(_labels(f)["waiting_lora_adapters"])))
        check_format(families)
        sample = lora_info(families, started, after)
        assert adapter_list(sample.labels["running_lora_adapters"]) == [RUNNING]
        assert only_series(families, "vllm:num_requests_running").value == 3  # two on the adapter, one on the base
        assert only_series(families, "vllm:num_requests_waiting").value == 2
        kv = only_series(families, "vllm:kv_cache_usage_perc").value
        cache = only_series(families, "vllm:cache_config_info")
        block_size, num_blocks = int(cache.labels["block_size"]), int(cache.labels["num_gpu_blocks"])
        kv_cache = server.state.engine.engine.kv_cache
        assert (block_size, num_blocks) == (kv_cache.block_size, kv_cache.num_usable_blocks)
        assert 0 < kv <= 1, "a fraction of the blocks, as vLLM reports it (not 0..100)"
        assert abs(kv * num_blocks - round(kv * num_blocks)) < 1e-6, "a whole number of blocks in use"
        # The picker would send the running adapter's traffic here and the waiting ones elsewhere.
        assert affinity_score(sample, RUNNING) == 1.0
        assert affinity_score(sample, WAITING[0]) == 0.6
        assert affinity_score(sample, "some-other-adapter") == 0.0

        second, _, after_second = wait_for(server, lambda f: lora_info(f, started, time.time() + 1).value
                                           > sample.value)
        assert lora_info(second, started, after_second).value > sample.value  # moves with the engine steps
        assert all(f.result() == 200 for f in first + later)

    idle, _, after_idle = wait_for(server, lambda f: only_series(f, "vllm:num_requests_running").value == 0
                                   and only_series(f, "vllm:num_requests_waiting").value == 0)
    sample = lora_info(idle, started, after_idle)
    assert sample.labels["running_lora_adapters"] == sample.labels["waiting_lora_adapters"] == ""
    assert affinity_score(sample, WAITING[0]) == 0.8  # a free slot again
    assert 0 <= only_series(idle, "vllm:kv_cache_usage_perc").value <= 1


def test_adapter_names_in_the_labels_and_who_can_read_them(server, slow_engine):
    """Label names are the adapters' own names (the `model` a caller sends, which is what the picker matches);
    they are global, not per tenant. /metrics left open for the picker shows them to any client that reaches
    the port, whatever its key: a tenant learns the names other tenants are running. The NetworkPolicy, or
    metrics_require_key / metrics_key_sha256 where no picker scrapes, is what limits that."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(_complete, server, BETA_KEY, WAITING[0], 30)
        families, _, _ = wait_for(server, lambda f: _labels(f)["running_lora_adapters"] == WAITING[0])
        seen_by_acme = scrape(server, ACME_KEY)
        assert running.result() == 200
    assert WAITING[0] in _labels(families)["running_lora_adapters"]  # anonymous client: beta's adapter name
    assert "vllm:lora_requests_info" in seen_by_acme  # acme may not use beta-* but reads the same metrics
    with server.client(ACME_KEY) as acme:
        assert acme.post("/v1/completions", json={"model": WAITING[0], "prompt": "Hi"}).status_code == 404
        assert WAITING[0] not in {m["id"] for m in acme.get("/v1/models").json()["data"]}
    with server.client(BETA_KEY) as beta:
        assert WAITING[0] in {m["id"] for m in beta.get("/v1/models").json()["data"]}
    assert server.state.settings.is_metrics_protected is False


def test_a_protected_metrics_endpoint_refuses_a_keyless_picker(tiny_llama_dir, tmp_path):
    """metrics_key_sha256 (or metrics_require_key) hides the names, and with them the picker's inputs: its
    metrics data source sends no credentials. One or the other, per deployment."""
    settings = api_settings(tiny_llama_dir, tmp_path / "store", metrics_key_sha256=_sha("scraper"))
    with live_server(settings) as live:
        with live.client() as picker:
            assert picker.get("/metrics").status_code == 401
        families = scrape(live, "scraper")
        assert set(lora_info(families, 0, time.time(), settings.max_slots).labels) == LORA_LABELS
