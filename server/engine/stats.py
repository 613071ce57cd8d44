"""Engine-side metric updates: called from the engine thread at every step and request event."""

from __future__ import annotations

import time

from server import metrics
from server.engine.request import FinishReason, Request


class EngineMetrics:
    """Binds the Prometheus families to one model name and records engine events."""

    def __init__(self, model_name: str, max_lora: int):
        self.model_name = model_name
        self.max_lora = str(max_lora)
        self._lora_labels: tuple[str, str] | None = None
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
            metrics.iteration_tokens.labels(self.model_name).observe(num_tokens)
        if num_preempted:
            metrics.num_preemptions.labels(self.model_name).inc(num_preempted)

    def record_step(self, running: list[Request], waiting: list[Request], kv_usage: float,
                    batch_adapters: int | None) -> None:
        m = self.model_name
        metrics.num_requests_running.labels(m).set(len(running))
        metrics.num_requests_waiting.labels(m).set(len(waiting))
        metrics.kv_cache_usage_perc.labels(m).set(kv_usage)
        labels = (_adapter_names(running), _adapter_names(waiting))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                metrics.lora_requests_info.remove(m, self.max_lora, *self._lora_labels)
            self._lora_labels = labels
        metrics.lora_requests_info.labels(m, self.max_lora, *labels).set(time.time())
        if batch_adapters is not None:
            metrics.batch_distinct_adapters.labels(m).observe(batch_adapters)

    def record_scheduled(self, request: Request) -> None:
        metrics.request_queue_time_seconds.labels(self.model_name).observe(
            request.first_scheduled_time - request.arrival_time
        )
        # As vLLM: every prompt token is a query; the hits are the tokens whose KV blocks were reused.
        metrics.prefix_cache_queries.labels(self.model_name).inc(len(request.prompt_token_ids))
        metrics.prefix_cache_hits.labels(self.model_name).inc(request.num_prefix_hit_tokens)

    def record_prefill(self, num_tokens: int) -> None:
        metrics.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def record_token(self, request: Request, now: float) -> None:
        m = self.model_name
        metrics.generation_tokens.labels(m).inc()
        if request.first_token_time is None:
            request.first_token_time = now
            metrics.time_to_first_token_seconds.labels(m).observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            metrics.inter_token_latency_seconds.labels(m).observe(now - request.last_token_time)
        request.last_token_time = now

    def record_finished(self, request: Request) -> None:
        m = self.model_name
        reason = request.finish_reason or FinishReason.ABORT
        metrics.e2e_request_latency_seconds.labels(m).observe(time.monotonic() - request.arrival_time)
        metrics.request_success.labels(m, reason.value).inc()
        adapter = request.adapter.name if request.adapter else ""
        status = "error" if reason is FinishReason.ERROR else "abort" if reason is FinishReason.ABORT else "ok"
        metrics.adapter_requests.labels(m, adapter or "base", status).inc()
        self._record_request_stats(request)

    def _record_request_stats(self, request: Request) -> None:
        """vLLM's per-request histograms, for a request that was scheduled (phases as vLLM splits them:
        prefill = scheduled to first token, decode = first to last token, inference = both)."""
        if request.first_scheduled_time is None:
            return
        m = self.model_name
        families = metrics.length_histograms.get()
        if families:
            prompt_tokens, generation_tokens, max_tokens = families
            prompt_tokens.labels(m).observe(len(request.prompt_token_ids))
            generation_tokens.labels(m).observe(len(request.output_token_ids))
            max_tokens.labels(m).observe(request.params.max_tokens)
        metrics.request_params_n.labels(m).observe(1)
        if request.first_token_time is None or request.last_token_time is None:
            return
        metrics.request_prefill_time_seconds.labels(m).observe(request.first_token_time - request.first_scheduled_time)
        metrics.request_decode_time_seconds.labels(m).observe(request.last_token_time - request.first_token_time)
        metrics.request_inference_time_seconds.labels(m).observe(request.last_token_time - request.first_scheduled_time)

    def record_swap(self, mode: str, seconds: float, tier: str = "gpu") -> None:
        metrics.adapter_swaps.labels(self.model_name, mode).inc()
        metrics.adapter_load_seconds.labels(self.model_name, tier).observe(seconds)

    def record_resident(self, tier: str, count: int) -> None:
        metrics.adapters_resident.labels(self.model_name, tier).set(count)


def _adapter_names(requests: list[Request]) -> str:
    return ",".join(sorted({r.adapter.name for r in requests if r.adapter is not None}))
