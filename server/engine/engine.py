"""The synchronous engine core: `add_request`, `step`, `abort`, `has_unfinished`.

A step schedules (admit, chunk, preempt), runs prefill chunks and the decode batch, samples, and
turns new tokens into `RequestOutput`s. The asynchronous wrapper (async_engine) drives it from a
thread. Adapter policy per mode:
- unmerged: each request holds a GPU slot for its adapter version; one batch mixes adapters.
- merged: one adapter version is merged into the base weights; only its requests run; when the
  batch drains, the swapper rebuilds the weights for the adapter at the head of the queue.
- auto: merge while every running and waiting request uses one adapter and the measured saving pays
  for the swaps (server.engine.auto_mode); unmerge before the next step when other demand arrives.
"""

from __future__ import annotations

import logging
import time

import torch

from server.config import LoraMode, Settings
from server.engine import merge_switch, overlap
from server.engine.auto_mode import AutoModePolicy
from server.engine.detokenizer import TokenDecoder, update_text
from server.engine.grammar import GrammarBackend
from server.engine.guard import empty_cuda_cache
from server.engine.kv_cache import KVCache, bytes_per_block, choose_num_blocks
from server.engine.metric_sink import DeltaSink, PrometheusSink
from server.engine.overlap import LaunchedStep
from server.engine.rank_pool import block_size
from server.engine.request import FinishReason, Request, RequestOutput, RequestStatus, check_prompt
from server.engine.runner import ModelRunner
from server.engine.sampler import SampledTokens, Sampler
from server.engine.scheduler import Admission, Scheduler
from server.engine.setup import adapter_pool_units, allocate_adapter_pool, eos_ids, tenant_counters
from server.engine.slot_table import SLOT_LOADING, SlotTable
from server.engine.stats import EngineMetrics
from server.engine.step_trace import StepTrace
from server.model.loader import LoadedModel, load_phase
from server.model.lora import max_adapter_rank
from server.model.merge import MergedSwapper

log = logging.getLogger(__name__)
# Waiting requests at the queue's head whose adapters are copied into idle slots ahead of admission: a
# few, so that a long queue of cold adapters cannot evict every idle resident adapter each step.
PREFETCH_LOOKAHEAD = 4


class LLMEngine:
    """Model, KV cache, adapter slots, scheduler and sampler for one base model."""

    def __init__(self, loaded: LoadedModel, settings: Settings, detokenize: bool = True,
                 metrics_sink: PrometheusSink | DeltaSink | None = None):
        """`detokenize` False: outputs carry token ids only and stop strings are the caller's business
        (the engine process: the API process detokenizes)."""
        self.detokenize = detokenize
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.model_id
        cfg = loaded.config
        self.max_model_len = min(settings.max_model_len, cfg.max_position_embeddings)
        self.mode = settings.lora_mode
        self.merged_active = self.mode is LoraMode.MERGED
        pool_units = adapter_pool_units(self.model, settings)
        self.slot_table = SlotTable(pool_units, self._load_slot, self._slot_loaded,
                                    on_evicted=self._slot_evicted, rank_of=max_adapter_rank)
        # Adapters of max_rank the pool holds: at least this many distinct adapters fit (vLLM's max_loras,
        # reported as max_lora); smaller ranks fit more.
        self.num_slots = pool_units // block_size(settings.max_rank)
        # Before the KV cache, which takes a share of what is left; none in merged mode.
        self.lora_slots = None if self.mode is LoraMode.MERGED else allocate_adapter_pool(
            self.model, pool_units, settings.max_rank, self.slot_table.num_slots)
        per_block = bytes_per_block(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.model.dtype)
        num_blocks = choose_num_blocks(
            settings.kv_cache_blocks, settings.kv_cache_memory_fraction, per_block, self.model.device,
            settings.max_batch_size, self.max_model_len,
        )
        with load_phase("kv cache", f"{num_blocks} blocks, {num_blocks * per_block / 2**20:.0f} MiB"):
            self.kv_cache = KVCache(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim,
                                    self.model.dtype, self.model.device)
        self.model.kv_cache = self.kv_cache.layer_caches()
        if self.kv_cache.num_usable_blocks * self.kv_cache.block_size < self.max_model_len:
            # One sequence must always fit, or preempting everything else could never make room.
            self.max_model_len = self.kv_cache.num_usable_blocks * self.kv_cache.block_size
            log.warning("KV cache holds %d tokens: max_model_len lowered to that", self.max_model_len)
        self._draining: set[tuple[str, int]] = set()  # adapters refused new work until their block frees
        self.swapper = None if self.mode is LoraMode.UNMERGED else MergedSwapper(self.model)
        self.auto_policy = AutoModePolicy()
        if self.swapper is not None:
            with load_phase("merge warm-up", "a zero adapter swapped in and out: kernels built, a swap timed"):
                self.auto_policy.record_swap(self.swapper.warm_up())
        self.scheduler = Scheduler(self.kv_cache, settings.max_batch_size, settings.max_num_batched_tokens,
                                   self._admit, self._release,
                                   self._prefix_space if settings.enable_prefix_caching else None,
                                   tenants=tenant_counters(settings), hold_steps=settings.prefill_hold_steps)
        self.runner = ModelRunner(self.model, self.kv_cache, settings.max_batch_size, self.max_model_len,
                                  use_lora=self.lora_slots is not None,
                                  use_cuda_graphs=settings.cuda_graphs,
                                  max_graph_rows=settings.cuda_graph_max_rows)
        self.scheduler.graph_rows = self.runner.graph_prefill_rows
        self.metrics = EngineMetrics(self.model_name, self.num_slots, metrics_sink)
        self.metrics.record_config(self.max_model_len, self.kv_cache.block_size, num_blocks,
                                   str(self.model.dtype).removeprefix("torch."),
                                   None if settings.kv_cache_blocks else settings.kv_cache_memory_fraction,
                                   settings.enable_prefix_caching)
        self.eos_token_ids = eos_ids(self.tokenizer, loaded.config.hf_config, loaded.hf_dir)
        self.sampler = Sampler(self.model.config.vocab_size, self.model.device, self.eos_token_ids,
                               GrammarBackend(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids))
        self.token_decoder = TokenDecoder(self.tokenizer)
        self._by_id: dict[str, Request] = {}
        self.trace = StepTrace()  # LORAPLEX_STEP_TRACE=DIR: one JSON line per step (diagnosis only)
        self.async_scheduling = settings.async_scheduling is not False  # unset: on (the HTTP server decides)
        self._ahead: LaunchedStep | None = None  # a step launched before the last one's tokens were read
        self._undelivered: list[RequestOutput] = []  # requests a launch failed, not yet returned by step()
        self._last_step_end = 0.0
        self.prefix_per_tenant = settings.prefix_cache_scope == "tenant"
        if self.model.device.type == "cuda" and settings.quantization == "nf4":
            from server.kernels.nf4 import nf4_autotune, nf4_dispatch

            # Before any graph capture: building the CUDA NF4 kernel takes ~90 s on a fresh machine.
            with load_phase("kernels", "the CUDA NF4 kernels, built once per machine"):
                log.info("NF4 kernels by batch rows: %s", nf4_dispatch.prepare())
            nf4_dispatch.reserve_scratch(self.model)  # one dequant buffer for every graph captured below
            if nf4_autotune.AUTOTUNE:  # each shape's kernel at each mid-sized bucket, before capture
                with load_phase("kernel tuning", "the NF4 kernel for each weight shape and batch size, timed"):
                    log.info("NF4 kernels tuned: %s", nf4_autotune.tune_model(
                        self.model, cache=nf4_autotune.cache_path(settings.cache_dir)))
        self.runner.prepare(settings.max_num_batched_tokens, (False, True) if self.runner.use_lora else (False,))
        with load_phase("sampler kernels", "the sampler's draw paths (CUDA), built and loaded before serving"):
            self.sampler.warm_up()
        log.info("engine ready: %d KV blocks (%.1f MiB), mode=%s, adapter pool=%d rank units",
                 num_blocks, num_blocks * per_block / 2**20, self.mode.value, self.slot_table.pool.capacity)

    # ---- public surface -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Validate and queue a request; raises SamplingError (a 4xx) on bad input."""
        request.params.validate()
        check_prompt(request.prompt_token_ids, self.max_model_len, self.model.config.vocab_size)
        request.params.validate_token_ids(self.model.config.vocab_size)
        self.auto_policy.record_arrival(request.adapter_key)
        self._by_id[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        """Remove a request; `reason` STOP when its caller found a stop string (a normal finish)."""
        request = self._by_id.pop(request_id, None)
        if request is None or self.scheduler.remove(request_id) is None:
            return None
        request.finish_reason = reason
        self.metrics.record_finished(request)
        self._record_state()
        return request.output("", finished=True)

    def has_unfinished(self) -> bool:
        return self._ahead is not None or self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns an output for every request that advanced or finished. With async
        scheduling the next decode step is launched before this one's tokens are read (server.engine.overlap)."""
        launched, self._ahead = self._ahead, None
        if launched is None:
            launched = self._launch()
        if self.async_scheduling:
            requests = overlap.still_running(launched)
            continuing = overlap.plan_ahead(self.scheduler, requests, self.max_model_len, self.mode is LoraMode.AUTO,
                                            self.merged_active)
            if continuing is not None:
                self._ahead = overlap.launch_ahead(self, continuing, requests, launched)
        outputs = []
        if launched.pending is not None:
            outputs = self._postprocess(launched.to_sample, launched.pending.resolve())
        outputs = self._undelivered + outputs  # requests a launch failed; fail_all returns them if this raised
        self._undelivered = []
        self._after_step(launched)
        return outputs

    def _launch(self, ahead: tuple[list[Request], torch.Tensor] | None = None,
                ending: set[int] = frozenset()) -> LaunchedStep:
        """Schedule a step (merged swaps, admissions, prefill chunks, the decode batch) and queue its work.
        `ahead`: launched before the last step's tokens were read (overlap.launch_ahead): that step's sampled
        requests and their device tokens, the decode rows' input ids; no swap. `ending` (ids): requests that
        end with those tokens, which get no row."""
        swap_start = time.perf_counter()
        merged_before, loads_before = self.merged_active, self.slot_table.num_loads
        if ahead is None:
            merge_switch.maybe_swap(self)
        step_start = time.perf_counter()
        batch = self.scheduler.schedule(ending)
        if ahead is not None and batch.preempted:  # plan_ahead checked the blocks: never happens
            raise RuntimeError("a step launched ahead preempted a request")
        input_ids = None if ahead is None else overlap.decode_input_ids(batch.decode, *ahead)
        self._prefetch_adapters()
        for request in batch.preempted:
            log.info("preempted %s (KV cache full); it will recompute", request.request_id)
        self.metrics.record_iteration(sum(n for _, n in batch.prefill) + len(batch.decode), len(batch.preempted))
        to_sample: list[Request] = []
        logits_parts: list[torch.Tensor] = []
        fused = False  # the prefill chunks ran in the decode graph's replay
        if batch.prefill:
            for request, _ in batch.prefill:
                if request.num_computed_tokens == request.num_prefix_hit_tokens:  # its first chunk
                    self.metrics.record_scheduled(request)
            try:  # fused: short chunks rode the decode graph's replay with the decode rows
                logits, fused = self.runner.prefill_step(batch.prefill, batch.decode, input_ids)
            except torch.cuda.OutOfMemoryError:
                # A long prompt ran out of memory: fail the requests of this prefill only; the decode
                # batch (its memory already in the KV cache and captured graphs) carries on.
                log.warning("out of memory in a prefill of %d tokens", sum(n for _, n in batch.prefill))
                self._undelivered += self.fail([r for r, _ in batch.prefill],
                                               "out of memory while processing the prompt")
                empty_cuda_cache()
                batch.prefill, logits, fused = [], None, False
            for request, chunk in batch.prefill:
                request.num_computed_tokens += chunk
                self.scheduler.register_computed_blocks(request)
                self.metrics.record_prefill(chunk)
                if not request.is_prefilling:
                    to_sample.append(request)
            if logits is not None:
                logits_parts.append(logits)
        if batch.decode and not fused:
            logits_parts.append(self.runner.decode(batch.decode, input_ids=input_ids))
        to_sample += batch.decode
        distinct = len({r.adapter_key for r in self.scheduler.running}) if self.scheduler.running else None
        pending = None
        if to_sample:
            logits = logits_parts[0] if len(logits_parts) == 1 else torch.cat(logits_parts)
            pending = self.sampler.sample_async(logits, to_sample)
        return LaunchedStep(batch, to_sample, pending, fused, swap_start, step_start, merged_before, loads_before,
                            distinct)

    def _after_step(self, launched: LaunchedStep) -> None:
        """Gauges, auto mode's step timing, the idle signal and the trace line of a step just read."""
        now = time.perf_counter()
        self._record_state(launched.distinct_adapters)
        batch = launched.batch
        if (self.mode is LoraMode.AUTO and batch.decode and not batch.prefill
                and (self.merged_active or any(r.slot >= 0 for r in batch.decode))):
            # A step launched ahead ran on the GPU from the previous step's end (or its own launch) to now.
            seconds = now - max(launched.step_start, self._last_step_end)
            self.auto_policy.record_step(self.merged_active, seconds, len(batch.decode))
        if not self.scheduler.running and not self.scheduler.waiting:
            self.auto_policy.on_idle()  # the engine goes idle: the next traffic starts a new arrival window
        if self.trace.enabled:
            self.trace.record_step(launched.swap_start, launched.step_start, batch, launched.fused, self.scheduler,
                                   self.merged_active, launched.merged_before,
                                   self.slot_table.num_loads - launched.slot_loads_before)
        self._last_step_end = now

    def _record_state(self, batch_adapters: int | None = None) -> None:
        """Gauges after the step: finished requests have left the batch, so idle reads as zero."""
        self.metrics.record_step(self.scheduler.running, list(self.scheduler.waiting), self.kv_cache.usage,
                                 batch_adapters)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every request with an error (after an unexpected exception inside a step)."""
        self._ahead = None
        undelivered, self._undelivered = self._undelivered, []
        return undelivered + self.fail(list(self.scheduler.running) + list(self.scheduler.waiting), message)

    def fail_ids(self, request_ids: list[str], message: str) -> list[RequestOutput]:
        """Finish the known requests among `request_ids` with an error."""
        return self.fail([self._by_id[i] for i in request_ids if i in self._by_id], message)

    def fail(self, requests: list[Request], message: str) -> list[RequestOutput]:
        """Finish `requests` with an error; their cache blocks and slots are freed."""
        outputs = []
        for request in requests:
            self.scheduler.remove(request.request_id)
            self._by_id.pop(request.request_id, None)
            if request.token_pending:  # a step launched ahead failed before its tokens were read
                request.output_token_ids.pop()
                request.token_pending = False
            request.finish_reason = FinishReason.ERROR
            self.metrics.record_finished(request)
            outputs.append(request.output("", finished=True, error=message))
        self._record_state()
        return outputs

    # ---- adapter policy ---------------------------------------------------------------------------

    def _admit(self, request: Request) -> Admission:
        if self.merged_active:
            return Admission.ADMIT if request.adapter_key == self.swapper.current else Admission.BLOCK
        if request.adapter is None:
            request.slot = -1
            return Admission.ADMIT
        key = request.adapter_key
        if self._draining:
            if all(self.slot_table.users(k) == 0 for k in self._draining):
                self._draining = set()  # drained: the block goes to whoever is first in line
            elif key in self._draining:
                return Admission.SKIP
        slot = self.slot_table.acquire(key, request.adapter.weights)
        if slot == SLOT_LOADING:
            return Admission.SKIP  # its copy runs beside the batch (CUDA); admitted once it is done
        if slot is None:
            # No room: every block that could hold it has work running. Stop admitting new work for the
            # adapters of the block cheapest to empty (all of them: a large adapter needs every small one
            # in its aligned block gone at once); without this, steady traffic to them starves this one.
            if not self._draining:
                self._draining = set(self.slot_table.blocking_keys(request.adapter.weights))
            return Admission.SKIP
        request.slot = slot
        return Admission.ADMIT

    def _release(self, request: Request) -> None:
        self.sampler.release(request)
        if request.slot >= 0:
            self.slot_table.release(request.adapter_key)
            request.slot = -1

    def _prefix_space(self, request: Request) -> bytes:
        """Prefix-cache namespace: blocks are shared only within one adapter version and weight mode."""
        from server.engine.prefix_cache import namespace

        merged = self.merged_active and request.adapter_key == (self.swapper.current if self.swapper else None)
        tenant = request.tenant if self.prefix_per_tenant else None
        return namespace(request.adapter_key, merged, request.params.cache_salt, tenant)

    def _load_slot(self, slot: int, offset: int, weights):
        return self.lora_slots.load(slot, offset, weights)

    def _slot_loaded(self, seconds: float) -> None:
        self.metrics.record_swap("unmerged", seconds)
        self.metrics.record_tier_load("gpu")
        table = self.slot_table
        self.metrics.record_resident("gpu", table.num_resident,
                                     table.pool.used * self.lora_slots.unit_nbytes)

    def _slot_evicted(self, key) -> None:
        self.metrics.record_evictions("gpu")

    def _prefetch_adapters(self) -> None:
        """Start slot copies for the adapters of the next waiting requests, while the batch decodes (CUDA
        only: on the CPU a copy is synchronous, so it waits for the request's own admission)."""
        if self.lora_slots is None or not self.lora_slots.is_async or self.merged_active:
            return
        for request in list(self.scheduler.waiting)[:PREFETCH_LOOKAHEAD]:
            if request.adapter is not None and request.adapter_key not in self._draining:
                self.slot_table.prefetch(request.adapter_key, request.adapter.weights)

    # ---- outputs ----------------------------------------------------------------------------------

    def _postprocess(self, requests: list[Request], sampled: SampledTokens) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for row, (request, token) in enumerate(zip(requests, sampled.token_ids, strict=True)):
            if request.status is RequestStatus.FINISHED:
                # Ended (its token of the step before, an abort) while this step ran ahead: the token is
                # dropped, and so is the fairness charge its row took when scheduled.
                self.scheduler.tenants.refund_output(request)
                continue
            if request.token_pending:
                request.output_token_ids[-1] = token
                request.token_pending = False
            else:
                request.output_token_ids.append(token)
            if sampled.logprobs is not None:
                request.output_logprobs.append(sampled.logprobs[row])
            if request.params.top_logprobs:
                request.output_top_logprobs.append(sampled.top_logprobs[row])
            request.num_computed_tokens = request.num_tokens - 1
            self.scheduler.register_computed_blocks(request)
            self.metrics.record_token(request, now)
            if request.grammar_matcher is not None:
                request.grammar_matcher.consume_token(token)
            request.finish_reason = request.finish_reason_after(token, self.eos_token_ids, self.max_model_len)
            request.ends_on_stop_token = request.is_stop_token(token, self.eos_token_ids)  # then finished: STOP
            new_text = update_text(request, self.token_decoder) if self.detokenize else ""
            finished = request.finish_reason is not None
            if finished:
                self.scheduler.finish(request)
                self._by_id.pop(request.request_id, None)
                self.metrics.record_finished(request)
            outputs.append(request.output(new_text, finished))
        return outputs
