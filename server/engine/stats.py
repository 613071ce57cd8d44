"""Engine-side metric updates: called from the engine loop at every step and request event.

They go to a sink (server.engine.metric_sink): the Prometheus families of this process when the
engine runs in a thread, or a batch shipped to the API process when it runs in its own process.
The series primed at construction and `record_config` set this process's registry directly; with the
engine in its own process the API process repeats both (server.engine.client) from `Ready`.
"""

from __future__ import annotations

import time

from server import hop_trace, metrics
from server.engine.metric_sink import LENGTH_FAMILY, DeltaSink, PrometheusSink
from server.engine.request import FinishReason, Request


class EngineMetrics:
    """Binds the Prometheus families to one model name and records engine events."""

    def __init__(self, model_name: str, max_lora: int, sink: PrometheusSink | DeltaSink | None = None):
        self.model_name = model_name
        self.max_lora = str(max_lora)
        self.sink = sink or PrometheusSink()
        self._lora_labels: tuple[str, str] | None = None
        self.config: tuple | None = None  # record_config's arguments
        for family in (metrics.num_preemptions, metrics.iteration_tokens, metrics.request_params_n,
                       metrics.request_inference_time_seconds, metrics.request_prefill_time_seconds,
                       metrics.request_decode_time_seconds, metrics.prefix_cache_queries, metrics.prefix_cache_hits):
            family.labels(model_name)  # every series exists (at 0) from the start
        # One lora_requests_info series per process: an engine built after another (a restart, tests) drops the
        # old one's, which the gateway's endpoint picker would otherwise keep reading beside the live one.
        metrics.lora_requests_info.clear()

    def record_config(self, max_model_len: int, block_size: int, num_gpu_blocks: int, cache_dtype: str,
                      memory_fraction: float | None, enable_prefix_caching: bool = False) -> None:
        """vllm:cache_config_info, and the token-count histograms whose buckets follow max_model_len."""
        self.config = (max_model_len, block_size, num_gpu_blocks, cache_dtype, memory_fraction,
                       enable_prefix_caching)
        metrics.length_histograms.configure(max_model_len)
        for family in metrics.length_histograms.get():
            family.labels(self.model_name)
        metrics.cache_config_info.clear()
        metrics.cache_config_info.labels(
            model_name=self.model_name, block_size=str(block_size), cache_dtype=cache_dtype,
            enable_prefix_caching=str(enable_prefix_caching),
            gpu_memory_utilization=str(memory_fraction), num_gpu_blocks=str(num_gpu_blocks),
            num_cpu_blocks="None", swap_space="0",
        ).set(1)

    def record_iteration(self, num_tokens: int, num_preempted: int) -> None:
        """One engine step: tokens it ran (prefill chunks + decode rows) and requests it preempted."""
        if num_tokens:
            self.sink.observe("iteration_tokens", (self.model_name,), num_tokens)
        if num_preempted:
            self.sink.inc("num_preemptions", (self.model_name,), num_preempted)

    def record_step(self, running: list[Request], waiting: list[Request], kv_usage: float,
                    batch_adapters: int | None) -> None:
        m, sink = (self.model_name,), self.sink
        sink.set("num_requests_running", m, len(running))
        sink.set("num_requests_waiting", m, len(waiting))
        sink.set("kv_cache_usage_perc", m, kv_usage)
        labels = (_adapter_names(running), _adapter_names(waiting))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                sink.remove("lora_requests_info", (*m, self.max_lora, *self._lora_labels))
            self._lora_labels = labels
        sink.set("lora_requests_info", (*m, self.max_lora, *labels), time.time())
        if batch_adapters is not None:
            sink.observe("batch_distinct_adapters", m, batch_adapters)

    def record_scheduled(self, request: Request) -> None:
        m, sink = self.model_name, self.sink
        queued = request.first_scheduled_time - request.arrival_time
        sink.observe("request_queue_time_seconds", (m,), queued)
        sink.observe("tenant_queue_time_seconds", (m, request.tenant or "none"), queued)
        # As vLLM: every prompt token is a query; the hits are the tokens whose KV blocks were reused.
        sink.inc("prefix_cache_queries", (m,), len(request.prompt_token_ids))
        sink.inc("prefix_cache_hits", (m,), request.num_prefix_hit_tokens)

    def record_prefill(self, num_tokens: int) -> None:
        self.sink.inc("prompt_tokens", (self.model_name,), num_tokens)

    def record_token(self, request: Request, now: float) -> None:
        m, sink = (self.model_name,), self.sink
        sink.inc("generation_tokens", m)
        if request.first_token_time is None:
            request.first_token_time = now
            hop_trace.TRACE.mark(request.request_id, "engine_first_token", now)
            sink.observe("time_to_first_token_seconds", m, now - request.arrival_time)
        elif request.last_token_time is not None:
            sink.observe("inter_token_latency_seconds", m, now - request.last_token_time)
        request.last_token_time = now

    def record_finished(self, request: Request) -> None:
        m, sink = self.model_name, self.sink
        reason = request.finish_reason or FinishReason.ABORT
        sink.observe("e2e_request_latency_seconds", (m,), time.monotonic() - request.arrival_time)
        sink.inc("request_success", (m, reason.value))
        adapter = request.adapter.name if request.adapter else ""
        status = "error" if reason is FinishReason.ERROR else "abort" if reason is FinishReason.ABORT else "ok"
        sink.inc("adapter_requests", (m, adapter or "base", status))
        self._record_request_stats(request)

    def _record_request_stats(self, request: Request) -> None:
        """vLLM's per-request histograms, for a request that was scheduled (phases as vLLM splits them:
        prefill = scheduled to first token, decode = first to last token, inference = both)."""
        if request.first_scheduled_time is None:
            return
        m, sink = (self.model_name,), self.sink
        if metrics.length_histograms.get():
            lengths = (len(request.prompt_token_ids), len(request.output_token_ids), request.params.max_tokens)
            for index, length in enumerate(lengths):
                sink.observe(f"{LENGTH_FAMILY}{index}", m, length)
        sink.observe("request_params_n", m, 1)
        if request.first_token_time is None or request.last_token_time is None:
            return
        sink.observe("request_prefill_time_seconds", m, request.first_token_time - request.first_scheduled_time)
        sink.observe("request_decode_time_seconds", m, request.last_token_time - request.first_token_time)
        sink.observe("request_inference_time_seconds", m, request.last_token_time - request.first_scheduled_time)

    def record_swap(self, mode: str, seconds: float, tier: str = "gpu") -> None:
        self.sink.inc("adapter_swaps", (self.model_name, mode))
        self.sink.observe("adapter_load_seconds", (self.model_name, tier), seconds)

    def record_resident(self, tier: str, count: int, nbytes: int | None = None) -> None:
        self.sink.set("adapters_resident", (self.model_name, tier), count)
        if nbytes is not None:
            self.sink.set("adapter_bytes_resident", (self.model_name, tier), nbytes)

    def record_tier_load(self, tier: str) -> None:
        self.sink.inc("adapter_loads", (self.model_name, tier))

    def record_evictions(self, tier: str, count: int = 1) -> None:
        self.sink.inc("adapter_evictions", (self.model_name, tier), count)


def _adapter_names(requests: list[Request]) -> str:
    return ",".join(sorted({r.adapter.name for r in requests if r.adapter is not None}))
