"""Async scheduling: launch decode step N+1 before the host has read step N's tokens.

A serial engine step is host work (schedule, build the inputs, launch the replay and the sampler), then a
wait for the GPU, then host work again (append the tokens, stop checks, detokenize, outputs). The GPU idles
through both host parts: on the H200 a 1B batch-32 step took 2.89 ms of wall time for 2.03 ms of GPU time,
and 8B batch 1 3.65 for 3.33. vLLM V1's async scheduling and SGLang's overlap scheduler hide that host work
behind the GPU; this is the same idea for the steady decode batch:

1. step N is launched as usual; its sampled tokens stay on the device (`Sampler.sample_async`), their copy
   to the host queued right behind the sampler (so the read below waits for N only, not for N + 1);
2. if nothing but N's requests wants the GPU next, each of them gets a placeholder token (-1) on the host,
   the scheduler gives each one more KV slot, and step N + 1 is launched with N's device tokens as its
   input ids (`ModelRunner.decode(input_ids=...)`): positions, KV slots, context lengths, adapter slots,
   seeds (a hash of the output index) and min_tokens masks depend only on how many tokens there are;
3. then N's tokens are read (the step's one host sync) and processed while N + 1 runs on the GPU; each
   placeholder becomes its token. The next engine step starts from N + 1, already launched.

A request that step N ends (EOS, stop token, an abort, a stop string the API process finds later) has a row
in N + 1 anyway; that row's token is dropped when N + 1 is read (its request is FINISHED by then). Freeing its
KV blocks and adapter slot before N + 1 has run is safe: every later use of them is queued on the GPU after
N + 1 (the adapter copy stream waits for the compute stream), and the one KV slot N + 1 writes lies in a block
not yet full, so never in the prefix cache.

Step N + 1 runs ahead only when it is exactly N's decode rows again: no request waiting (admissions, swaps
and adapter loads happen in serial steps), no chunked prefill left, no grammar (its mask needs N's token on
the host), no request at its last token (max_tokens or max_model_len: N ends it whatever the token), KV blocks
for every next token without a preemption, and in auto mode, not while one adapter's unmerged traffic may be
merged next step. Otherwise the step runs serially as before. `async_scheduling = false` turns it off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from server.engine.request import Request, RequestOutput, RequestStatus
from server.engine.sampler import PendingTokens
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.model.host_device import to_device

PLACEHOLDER = -1  # an output token the host has not read yet


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device and whose tokens are not read yet."""

    batch: ScheduledBatch
    to_sample: list[Request]  # the rows of `pending`, in order
    pending: PendingTokens | None  # None: nothing to sample (prefill chunks only)
    failed: list[RequestOutput]  # requests the launch already failed (a prefill out of memory)
    fused: bool  # the prefill chunks rode the decode graph's replay
    swap_start: float  # perf_counter before the merged swap (if any)
    step_start: float  # perf_counter after it
    merged_before: bool
    slot_loads_before: int
    distinct_adapters: int | None  # adapters of the running batch when launched (a gauge)


def can_run_ahead(scheduler: Scheduler, requests: list[Request], max_model_len: int, mixed_only: bool) -> bool:
    """Whether the step after the one that samples `requests` is exactly their decode rows again (see the
    module docstring); `mixed_only`: only when they use two adapters or more (auto mode, unmerged)."""
    if scheduler.waiting or not requests or len(requests) != len(scheduler.running):
        return False
    if mixed_only and len({r.adapter_key for r in requests}) < 2:
        return False
    for request in requests:
        params = request.params
        if (request.status is not RequestStatus.RUNNING or request.token_pending or request.is_prefilling
                or params.grammar is not None or len(request.output_token_ids) + 1 >= params.max_tokens
                or request.num_tokens + 1 >= max_model_len):
            return False
    return scheduler.can_extend(requests)


def still_running(launched: LaunchedStep) -> tuple[list[Request], torch.Tensor | None]:
    """The launched step's requests that no abort or finish has ended, and their device tokens (None: the
    step sampled nothing)."""
    if launched.pending is None:
        return [], None
    rows = [row for row, r in enumerate(launched.to_sample) if r.status is RequestStatus.RUNNING]
    chosen = launched.pending.chosen
    if len(rows) < len(launched.to_sample):
        chosen = chosen.index_select(0, to_device(rows, torch.long, chosen.device))
    return [launched.to_sample[row] for row in rows], chosen


def launch_ahead(engine, requests: list[Request], input_ids: torch.Tensor) -> LaunchedStep:
    """Launch the decode step of `requests`, whose last tokens are `input_ids` on the device, before the host
    knows them (can_run_ahead said yes)."""
    start = time.perf_counter()
    for request in requests:
        request.output_token_ids.append(PLACEHOLDER)
        request.token_pending = True
    batch = engine.scheduler.extend_decode(requests)
    engine.metrics.record_iteration(len(requests), 0)
    logits = engine.runner.decode(requests, input_ids=input_ids)
    pending = engine.sampler.sample_async(logits, requests)
    return LaunchedStep(batch, requests, pending, [], False, start, start, engine.merged_active,
                        engine.slot_table.num_loads, len({r.adapter_key for r in requests}))
