"""Every Prometheus metric, defined once. Names follow vLLM so its dashboards and the Gateway API
Inference Extension work unchanged; loraplex_* metrics are our own. Like vLLM, no family emits a
`_created` series.

vllm:prefix_cache_queries counts the prompt tokens looked up, vllm:prefix_cache_hits those whose KV
blocks the automatic prefix cache supplied (server.engine.kv_cache).
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
BASE_LABEL, OTHER_LABEL = "base", "other"
_SHARED_LABELS = frozenset((BASE_LABEL, OTHER_LABEL))
DEFAULT_MAX_ADAPTER_LABELS = 100

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.5)

num_requests_running = Gauge(
    "vllm:num_requests_running", "Requests in the running batch", ["model_name"], registry=REGISTRY
)
num_requests_waiting = Gauge(
    "vllm:num_requests_waiting", "Requests waiting to be scheduled", ["model_name"], registry=REGISTRY
)
kv_cache_usage_perc = Gauge(
    "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)", ["model_name"], registry=REGISTRY
)
lora_requests_info = Gauge(
    "vllm:lora_requests_info",
    "Running/waiting adapters; the value is the update time",
    ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    registry=REGISTRY,
)
time_to_first_token_seconds = Histogram(
    "vllm:time_to_first_token_seconds", "Time to first token", ["model_name"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
inter_token_latency_seconds = Histogram(
    "vllm:inter_token_latency_seconds", "Time between output tokens", ["model_name"],
    buckets=_TOKEN_LATENCY_BUCKETS, registry=REGISTRY,
)
e2e_request_latency_seconds = Histogram(
    "vllm:e2e_request_latency_seconds", "Arrival to finish", ["model_name"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
request_queue_time_seconds = Histogram(
    "vllm:request_queue_time_seconds", "Arrival to first scheduled", ["model_name"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
# The API process's share of a request's time to first token, around the engine's own (arrival to first
# token): what a client sees beyond the two is HTTP parsing before the app, the send and its own reading.
http_admission_seconds = Histogram(
    "loraplex_http_admission_seconds", "HTTP request received by the app to its arrival at the engine "
    "(auth, limits, body, adapter resolution)", ["model_name"], buckets=_TOKEN_LATENCY_BUCKETS, registry=REGISTRY,
)
http_first_output_seconds = Histogram(
    "loraplex_http_first_output_seconds", "Arrival at the engine to the first output in the API's hands "
    "(the engine's time to first token plus the way back)", ["model_name"], buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens", ["model_name"], registry=REGISTRY)
generation_tokens = Counter(
    "vllm:generation_tokens", "Generated tokens", ["model_name"], registry=REGISTRY
)
request_success = Counter(
    "vllm:request_success", "Finished requests", ["model_name", "finished_reason"], registry=REGISTRY
)

# vLLM's request_latency_buckets, for the per-request phase times below.
_REQUEST_PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                          120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
num_preemptions = Counter(
    "vllm:num_preemptions", "Cumulative number of preemption from the engine.", ["model_name"], registry=REGISTRY
)
iteration_tokens = Histogram(
    "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ["model_name"],
    buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=REGISTRY,
)
request_params_n = Histogram(
    "vllm:request_params_n", "Histogram of the n request parameter.", ["model_name"],
    buckets=(1, 2, 5, 10, 20), registry=REGISTRY,
)
request_inference_time_seconds = Histogram(
    "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
    ["model_name"], buckets=_REQUEST_PHASE_BUCKETS, registry=REGISTRY,
)
request_prefill_time_seconds = Histogram(
    "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
    ["model_name"], buckets=_REQUEST_PHASE_BUCKETS, registry=REGISTRY,
)
request_decode_time_seconds = Histogram(
    "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
    ["model_name"], buckets=_REQUEST_PHASE_BUCKETS, registry=REGISTRY,
)
prefix_cache_queries = Counter(
    "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", ["model_name"],
    registry=REGISTRY,
)
prefix_cache_hits = Counter(
    "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
    ["model_name"], registry=REGISTRY,
)
CACHE_CONFIG_LABELS = ("model_name", "block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization",
                       "num_gpu_blocks", "num_cpu_blocks", "swap_space")
cache_config_info = Gauge(
    "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(CACHE_CONFIG_LABELS),
    registry=REGISTRY,
)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class _LengthHistograms:
    """vllm:request_prompt_tokens, request_generation_tokens and request_params_max_tokens: their
    buckets (vLLM's 1-2-5 ladder up to max_model_len) are known only once an engine starts, so they are
    (re)made then; `get()` returns the current three."""

    NAMES = (("vllm:request_prompt_tokens", "Number of prefill tokens processed."),
             ("vllm:request_generation_tokens", "Number of generation tokens processed."),
             ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter."))

    def __init__(self):
        self._lock = threading.Lock()
        self._families: tuple[Histogram, ...] = ()
        self._max_model_len: int | None = None

    def configure(self, max_model_len: int) -> None:
        with self._lock:
            if max_model_len == self._max_model_len:
                return
            for family in self._families:
                REGISTRY.unregister(family)
            buckets = build_1_2_5_buckets(max_model_len)
            self._families = tuple(Histogram(name, doc, ["model_name"], buckets=buckets, registry=REGISTRY)
                                   for name, doc in self.NAMES)
            self._max_model_len = max_model_len

    def get(self) -> tuple[Histogram, ...]:
        return self._families


length_histograms = _LengthHistograms()


class AdapterLabelCounter(Counter):
    """A Counter whose `adapter` label (the 2nd) takes at most `max_adapters` distinct adapter names;
    later names count under "other", so a tenant uploading thousands of adapters cannot grow /metrics
    without bound. `forget(name)` removes a deleted adapter's series and frees its place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_adapters = DEFAULT_MAX_ADAPTER_LABELS
        self._series_by_adapter: dict[str, set[tuple[str, ...]]] = {}
        self._names_lock = threading.Lock()

    def labels(self, *labelvalues, **labelkwargs):
        """Like Counter.labels, with the adapter name mapped to itself or to "other" (the cap)."""
        if labelkwargs or not self._labelnames:  # keyword labels or a child: nothing to map
            return super().labels(*labelvalues, **labelkwargs)
        model_name, adapter, *rest = (str(value) for value in labelvalues)
        with self._names_lock:
            if adapter not in self._series_by_adapter and adapter not in _SHARED_LABELS:
                num_named = len(self._series_by_adapter.keys() - _SHARED_LABELS)
                if num_named >= self.max_adapters:
                    adapter = OTHER_LABEL
            self._series_by_adapter.setdefault(adapter, set()).add((model_name, adapter, *rest))
        return super().labels(model_name, adapter, *rest)

    def forget(self, adapter: str) -> list[tuple[str, ...]]:
        """Remove every series of a deleted adapter (no-op for one that never had any); returns them."""
        if adapter in _SHARED_LABELS:
            return []
        with self._names_lock:
            series = self._series_by_adapter.pop(adapter, set())
        for labelvalues in series:
            with contextlib.suppress(KeyError):
                super().remove(*labelvalues)
        return sorted(series)

    def remove(self, *labelvalues) -> None:
        """Counter.remove, freeing the adapter's place under the cap with its last series."""
        super().remove(*labelvalues)
        if len(labelvalues) > 1:
            with self._names_lock:
                series = self._series_by_adapter.get(str(labelvalues[1]))
                if series is not None:
                    series.discard(tuple(str(value) for value in labelvalues))
                    if not series:
                        del self._series_by_adapter[str(labelvalues[1])]


    def forget_model(self, model_name: str) -> None:
        """Remove every series of one model, and the places under the cap they held."""
        with self._names_lock:
            gone = []
            for adapter, series in list(self._series_by_adapter.items()):
                gone += [s for s in series if s[0] == model_name]
                series.difference_update(gone)
                if not series:
                    del self._series_by_adapter[adapter]
        for labelvalues in gone:
            with contextlib.suppress(KeyError):
                self.remove(*labelvalues)


adapter_requests = AdapterLabelCounter(
    "loraplex_adapter_requests", "Requests per adapter and outcome (adapters past the label cap: 'other')",
    ["model_name", "adapter", "status"], registry=REGISTRY,
)
adapter_load_seconds = Histogram(
    "loraplex_adapter_load_seconds", "Adapter load time (disk to CPU, CPU to GPU slot)",
    ["model_name", "tier"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0), registry=REGISTRY,
)
adapters_resident = Gauge(
    "loraplex_adapters_resident", "Adapters resident per tier (disk, cpu, gpu)", ["model_name", "tier"],
    registry=REGISTRY,
)
adapter_swaps = Counter(
    "loraplex_adapter_swaps", "Adapter swaps (merged: weight swap; unmerged: slot load)",
    ["model_name", "mode"], registry=REGISTRY,
)
batch_distinct_adapters = Histogram(
    "loraplex_batch_distinct_adapters", "Distinct adapters in one engine step", ["model_name"],
    buckets=(0, 1, 2, 4, 8, 16, 32, 64), registry=REGISTRY,
)
# Adapter tiers (issue 15). tier: "cpu" (weights in host memory, loaded from disk) or "gpu" (slots).
adapter_bytes_resident = Gauge(
    "loraplex_adapter_bytes_resident",
    "Bytes of adapter weights per tier (cpu: cached plus evicted ones still used by a request; gpu: in slots)",
    ["model_name", "tier"], registry=REGISTRY,
)
adapter_loads = Counter(
    "loraplex_adapter_loads", "Adapter versions loaded into a tier (cpu: from disk; gpu: into a slot)",
    ["model_name", "tier"], registry=REGISTRY,
)
adapter_evictions = Counter(
    "loraplex_adapter_evictions", "Adapter versions evicted from a tier", ["model_name", "tier"], registry=REGISTRY,
)
# Tenants come from the keys file (few); without one every request is tenant "open".
tenant_queue_time_seconds = Histogram(
    "loraplex_tenant_queue_time_seconds", "Arrival to first scheduled, per tenant", ["model_name", "tenant"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)


def remove_model_series(model_name: str) -> None:
    """Drop every series labelled with `model_name` (an engine torn down in a process that lives on,
    e.g. a benchmark's in-process engine, must not leave a second model beside the served one)."""
    for collector in list(REGISTRY._collector_to_names):  # prometheus_client keeps no public list
        if isinstance(collector, AdapterLabelCounter):
            collector.forget_model(model_name)
            continue
        names = getattr(collector, "_labelnames", ())
        if "model_name" not in names:
            continue
        index = names.index("model_name")
        for values in list(getattr(collector, "_metrics", {})):
            if values[index] == model_name:
                collector.remove(*values)
