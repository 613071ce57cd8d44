"""Engine-side metric updates: called from the engine loop at every step and request event.

They go to a sink (server.engine.metric_sink): the Prometheus families of this process when the
engine runs in a thread, or a batch shipped to the API process when it runs in its own process.
"""

from __future__ import annotations

import time

from server.engine.metric_sink import DeltaSink, PrometheusSink
from server.engine.request import FinishReason, Request


class EngineMetrics:
    """Binds the Prometheus families to one model name and records engine events."""

    def __init__(self, model_name: str, max_lora: int, sink: PrometheusSink | DeltaSink | None = None):
        self.model_name = model_name
        self.max_lora = str(max_lora)
        self.sink = sink or PrometheusSink()
        self._lora_labels: tuple[str, str] | None = None

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
        self.sink.observe("request_queue_time_seconds", (self.model_name,),
                          request.first_scheduled_time - request.arrival_time)

    def record_prefill(self, num_tokens: int) -> None:
        self.sink.inc("prompt_tokens", (self.model_name,), num_tokens)

    def record_token(self, request: Request, now: float) -> None:
        m, sink = (self.model_name,), self.sink
        sink.inc("generation_tokens", m)
        if request.first_token_time is None:
            request.first_token_time = now
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

    def record_swap(self, mode: str, seconds: float, tier: str = "gpu") -> None:
        self.sink.inc("adapter_swaps", (self.model_name, mode))
        self.sink.observe("adapter_load_seconds", (self.model_name, tier), seconds)

    def record_resident(self, tier: str, count: int) -> None:
        self.sink.set("adapters_resident", (self.model_name, tier), count)


def _adapter_names(requests: list[Request]) -> str:
    return ",".join(sorted({r.adapter.name for r in requests if r.adapter is not None}))
