"""Every Prometheus metric, defined once. Names follow vLLM so its dashboards and the Gateway API
Inference Extension work unchanged; loraplex_* metrics are our own."""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens", ["model_name"], registry=REGISTRY)
generation_tokens = Counter(
    "vllm:generation_tokens", "Generated tokens", ["model_name"], registry=REGISTRY
)
request_success = Counter(
    "vllm:request_success", "Finished requests", ["model_name", "finished_reason"], registry=REGISTRY
)


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

    def forget(self, adapter: str) -> None:
        """Remove every series of a deleted adapter (no-op for one that never had any)."""
        if adapter in _SHARED_LABELS:
            return
        with self._names_lock:
            series = self._series_by_adapter.pop(adapter, set())
        for labelvalues in series:
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


# ---- Gateway API Inference Extension (model-server protocol) --------------------------------------------------
# Kept apart from the families above: the endpoint picker reads vllm:cache_config_info (optional in the
# protocol) for the KV block size and block count that its prefix-cache scorer assumes. vLLM's shape: an info
# gauge whose value is 1 and whose labels carry the numbers. tests/api/test_gateway_metrics.py checks it.
cache_config_info = Gauge(
    "vllm:cache_config_info", "KV cache configuration; the value is always 1",
    ["model_name", "block_size", "num_gpu_blocks"], registry=REGISTRY,
)


def set_cache_config_info(model_name: str, block_size: int, num_gpu_blocks: int) -> None:
    """Publish the KV cache shape for one model (one series: a restarted engine replaces it)."""
    cache_config_info.clear()
    cache_config_info.labels(model_name, str(block_size), str(num_gpu_blocks)).set(1)
