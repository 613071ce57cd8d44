"""What every route shares: settings, auth, rate limits, the engine, the adapter store and registry,
and the server's lifecycle phase (loading -> ready -> draining -> stopped, or failed)."""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
import time
from collections.abc import Callable

from adapters_store import AdapterStore, BaseModelSpec
from server import metrics
from server.api.auth import KeyRing
from server.api.generation_defaults import generation_defaults
from server.api.prompts import PromptEncoder
from server.api.ratelimit import RateLimiter
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.client import EngineProcessClient
from server.engine.engine import LLMEngine
from server.engine.engine_handle import EngineAttachment
from server.engine.metric_sink import PrometheusSink, RelayingSink
from server.engine.request import FinishReason
from server.heap import freeze_startup_heap
from server.model.loader import LOAD_PROGRESS, LoadedModel, load_model, load_model_info
from server.registry import AdapterRegistry, pin_memory_available

log = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    """Lifecycle of the server process as /ready and /health report it."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class ServerState:
    """Shared runtime objects; `start` builds them (blocking), `drain` and `stop` wind them down."""

    def __init__(self, settings: Settings, attachment: EngineAttachment | None = None):
        """`attachment`: this is one of several API processes (server.launcher) sharing the engine process
        the launcher started; each enforces its share (1/N) of every tenant's rate limits and relays its
        metric updates to the others."""
        self.settings = settings
        self.attachment = attachment
        num_api = 1 if attachment is None else attachment.num_clients
        self.keyring = KeyRing.from_file(settings.auth_file) if settings.auth_file else None
        self.limiter = RateLimiter(share=1 / num_api)
        # This process's own metric updates (HTTP admission, refusals): through a sink, so that
        # with several API processes each one's /metrics also counts the others'.
        self.metrics: PrometheusSink = RelayingSink() if num_api > 1 else PrometheusSink()
        self.phase = Phase.LOADING
        self.load_error: str | None = None
        self.engine: AsyncEngine | EngineProcessClient | None = None
        self.engine_core_target: Callable[..., None] | None = None  # tests: another engine process entry
        self.store: AdapterStore | None = None
        self.registry: AdapterRegistry | None = None
        self.prompts: PromptEncoder | None = None
        self.model_id = settings.served_model_name or ""
        self.max_model_len = settings.max_model_len
        self.sampling_defaults: dict[str, float] = {}  # the OpenAI routes' (server.api.generation_defaults)
        self.created = int(time.time())
        self.num_active_requests = 0  # HTTP requests in progress, probes excluded

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def is_alive(self) -> bool:
        """Liveness: true while loading, and afterwards while the engine loop runs."""
        if self.phase is Phase.LOADING:
            return True
        return self.engine is not None and self.engine.is_alive()

    @property
    def failure_reason(self) -> str:
        """Why the server cannot serve: its failed start, or the engine's death."""
        engine_error = self.engine.fatal_error if self.engine is not None else None
        return self.load_error or engine_error or "the engine loop has stopped"

    def start(self, loaded: LoadedModel | None = None) -> None:
        """Load the base model unless given, build store, registry and engine, start the engine loop.
        With `engine_process`, only the tokenizer and config load here; the engine process loads the
        weights (given weights are then unused)."""
        settings = self.settings
        LOAD_PROGRESS.reset()
        if settings.gil_switch_interval_ms is not None:
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        use_process = settings.engine_process or self.attachment is not None
        if loaded is None and use_process:
            loaded = load_model_info(settings.model, cache_dir=settings.cache_dir,
                                     served_model_name=settings.served_model_name)
        elif loaded is None:
            loaded = load_model(settings.model, cache_dir=settings.cache_dir, device=settings.device,
                                dtype=settings.dtype, quantization=settings.quantization,
                                served_model_name=settings.served_model_name)
        loaded.model_id = settings.served_model_name or loaded.model_id
        self.model_id = loaded.model_id
        if settings.generation_config == "auto":
            self.sampling_defaults = generation_defaults(loaded.hf_dir)
        spec = BaseModelSpec.from_hf_config(loaded.config.hf_config)
        self.store = AdapterStore(settings.adapters_dir, spec, settings.max_rank, settings.max_upload_bytes,
                                  versions_kept=settings.adapter_versions_kept)
        metrics.adapter_requests.max_adapters = settings.metrics_max_adapters
        self.registry = AdapterRegistry(self.store, settings.max_cpu_adapters, pin_memory_available(),
                                        on_load=self._on_adapter_load, max_bytes=settings.cpu_adapter_cache_bytes,
                                        on_evict=self._on_adapter_evict, load_weights=not use_process)
        if use_process:
            relay = self.metrics.pending if isinstance(self.metrics, RelayingSink) else None
            engine = EngineProcessClient(settings, loaded.tokenizer, self.model_id, loaded.hf_dir,
                                         self.engine_core_target, self.attachment, relay)
        else:
            if settings.async_scheduling is None:  # a thread of this process: the HTTP loop needs the GIL
                settings = settings.model_copy(update={"async_scheduling": False})
            core = LLMEngine(loaded, settings)
            core.metrics.record_step([], [], 0.0, None)
            engine = AsyncEngine(core, settings.max_queue_size)
        engine.start()  # the engine process loads the model here
        self.engine = engine  # only once started: None still means "loading" (server.serving)
        self.max_model_len = self.engine.max_model_len
        self.prompts = PromptEncoder(loaded.tokenizer, settings.max_prompt_chars, settings.tokenizer_threads)
        _prime_metrics(self.model_id, self.engine.num_slots)
        self.refresh_adapter_gauges()
        if settings.freeze_heap:
            freeze_startup_heap("http process" if use_process else "http process and engine thread")
        if self.phase is Phase.LOADING:  # not if a drain began while loading
            self.phase = Phase.READY
        log.info("ready: model %r, %d adapters on disk, max_model_len %d",
                 self.model_id, len(self.store.list()), self.max_model_len)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, then wait until in-flight requests finish; False if the timeout hit."""
        if self.phase in (Phase.READY, Phase.LOADING):
            self.phase = Phase.DRAINING
        deadline = time.monotonic() + timeout_s
        log.info("draining: %d requests in flight", self.num_active_requests)
        while self.num_active_requests > 0 or (self.engine is not None and self.engine.num_in_flight > 0):
            if time.monotonic() >= deadline:
                log.warning("drain timed out after %.0f s with %d requests in flight",
                            timeout_s, self.num_active_requests)
                return False
            await asyncio.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.prompts is not None:
            self.prompts.close()
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPED

    def refresh_adapter_gauges(self) -> None:
        """Set loraplex_adapters_resident for the disk and CPU tiers (blocking: lists the store). The engine
        process reports its own CPU tier. Read here, not relayed to the other API processes (two relayed
        counts could arrive out of order): each reads the store itself, after its own changes and before
        each /metrics scrape."""
        if self.store is None or self.registry is None:
            return
        metrics.adapters_resident.labels(self.model_id, "disk").set(self.store.count())
        if self.registry.load_weights:  # else the engine process reports its own CPU tier
            metrics.adapters_resident.labels(self.model_id, "cpu").set(self.registry.num_cached)
            metrics.adapter_bytes_resident.labels(self.model_id, "cpu").set(self.registry.nbytes)

    def _on_adapter_load(self, seconds: float, num_cached: int) -> None:
        cpu = (self.model_id, "cpu")
        self.metrics.observe("adapter_load_seconds", cpu, seconds)
        self.metrics.set("adapters_resident", cpu, num_cached)
        self.metrics.inc("adapter_loads", cpu)
        self.metrics.set("adapter_bytes_resident", cpu, self.registry.nbytes)

    def _on_adapter_evict(self, num_evicted: int) -> None:
        self.metrics.inc("adapter_evictions", (self.model_id, "cpu"), num_evicted)


def _prime_metrics(model_id: str, max_slots: int) -> None:
    """Create every labelled series at zero so dashboards and scrapers see each family from the start."""
    for family in (metrics.num_requests_running, metrics.num_requests_waiting, metrics.kv_cache_usage_perc,
                   metrics.time_to_first_token_seconds, metrics.inter_token_latency_seconds,
                   metrics.e2e_request_latency_seconds, metrics.request_queue_time_seconds,
                   metrics.prompt_tokens, metrics.generation_tokens, metrics.batch_distinct_adapters):
        family.labels(model_id)
    for reason in FinishReason:
        metrics.request_success.labels(model_id, reason.value)
    for tier in ("disk", "cpu", "gpu"):
        metrics.adapters_resident.labels(model_id, tier)
    for tier in ("cpu", "gpu"):
        for family in (metrics.adapter_load_seconds, metrics.adapter_bytes_resident, metrics.adapter_loads,
                       metrics.adapter_evictions):
            family.labels(model_id, tier)
    for mode in ("unmerged", "merged"):
        metrics.adapter_swaps.labels(model_id, mode)
    metrics.adapter_requests.labels(model_id, "base", "ok")
