"""Async scheduling: launch decode step N+1 before the host has read step N's tokens.

A serial engine step is host work (schedule, build the inputs, launch the replay and the sampler), then a
wait for the GPU, then host work again (append the tokens, stop checks, detokenize, outputs). The GPU idles
through both host parts: on the H200 a 1B batch-32 step took 2.89 ms of wall time for 2.03 ms of GPU time,
and 8B batch 1 3.65 for 3.33. vLLM V1's async scheduling and SGLang's overlap scheduler hide that host work
behind the GPU; this is the same idea for the steady decode batch:

1. step N is launched as usual; its sampled tokens stay on the device (`Sampler.sample_async`), their copy
   to the host queued right behind the sampler (so the read below waits for N only, not for N + 1);
2. each of N's requests gets a placeholder token (-1) on the host, step N + 1 is scheduled (one more KV
   slot each, admissions) and launched with N's device tokens as its decode rows' input ids
   (`ModelRunner.decode(input_ids=...)`): positions, KV slots, context lengths, adapter slots, seeds (a
   hash of the output index) and min_tokens masks depend only on how many tokens there are;
3. then N's tokens are read (the step's one host sync) and processed while N + 1 runs on the GPU; each
   placeholder becomes its token. The next engine step starts from N + 1, already launched.

A request that step N ends (EOS, stop token, an abort, a stop string the API process finds later) has a row
in N + 1 anyway; that row's token is dropped when N + 1 is read (its request is FINISHED by then). Freeing its
KV blocks and adapter slot before N + 1 has run is safe: every later use of them is queued on the GPU after
N + 1 (the adapter copy stream waits for the compute stream), and the one KV slot N + 1 writes lies in a block
not yet full, so never in the prefix cache.

Step N + 1 is scheduled as any step (waiting requests are admitted and prefilled beside the decode rows), and
runs ahead only when every running request was sampled in N (no chunked prefill continues), none has a
grammar (its mask needs N's token on the host), and the KV cache holds every next token without a
preemption. A request at its last token (max_tokens or max_model_len) ends with N's token whatever it is: it
gets no row in N + 1 (in a closed loop of staggered requests one ends at nearly every step). Merged swaps
happen in serial steps only: in auto mode a step runs ahead, merged, while nothing waits and, unmerged, while
the batch mixes adapters (auto could merge a single adapter's traffic next step). Otherwise the step runs
serially as before. `async_scheduling = false` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import Request, RequestStatus
from server.engine.sampler import PendingTokens
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.kernels.host_device import to_device

PLACEHOLDER = -1  # an output token the host has not read yet


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device and whose tokens are not read yet."""

    batch: ScheduledBatch
    to_sample: list[Request]  # the rows of `pending`, in order
    pending: PendingTokens | None  # None: nothing to sample (prefill chunks only)
    fused: bool  # the prefill chunks rode the decode graph's replay
    swap_start: float  # perf_counter before the merged swap (if any)
    step_start: float  # perf_counter after it
    merged_before: bool
    slot_loads_before: int
    distinct_adapters: int | None  # adapters of the running batch when launched (a gauge)


def plan_ahead(scheduler: Scheduler, requests: list[Request], max_model_len: int, auto: bool,
               merged: bool) -> list[Request] | None:
    """The requests that continue into a step launched before the tokens of `requests` are read, or None
    when that step must wait (see the module docstring). A request at its last token (max_tokens or
    max_model_len) ends whatever its token is: it gets no row. `auto`, `merged`: auto mode, and whether an
    adapter is merged now."""
    if not requests or len(requests) != len(scheduler.running):
        return None  # a chunked prefill continues (or nothing runs)
    keys = {r.adapter_key for r in requests}
    if auto and (scheduler.waiting if merged else len(keys) == 1 and None not in keys):
        # Auto mode swaps between serial steps: merged, any arrival may unmerge; unmerged, it merges only
        # when all demand (running included) is one adapter, which a batch of two keys or more, or of the
        # base model alone, cannot become.
        return None
    for request in requests:
        if (request.status is not RequestStatus.RUNNING or request.token_pending or request.is_prefilling
                or request.params.grammar is not None):
            return None
    continuing = [r for r in requests if not ends_with_next_token(r, max_model_len)]
    if not continuing and not scheduler.waiting:
        return None
    return continuing if scheduler.can_extend(continuing) else None


def ends_with_next_token(request: Request, max_model_len: int) -> bool:
    """Whatever the token being sampled is, the request ends with it (finish_reason LENGTH)."""
    return request.reaches_length(max_model_len, extra_tokens=1)


def still_running(launched: LaunchedStep) -> list[Request]:
    """The launched step's sampled requests that no abort or finish has ended."""
    return [r for r in launched.to_sample if r.status is RequestStatus.RUNNING]


def launch_ahead(engine, continuing: list[Request], requests: list[Request], launched: LaunchedStep) -> LaunchedStep:
    """Launch the next step of `continuing` (plan_ahead's, among the still running `requests` of `launched`)
    before the host knows `launched`'s tokens: placeholders on the host, then a step scheduled as any other
    (waiting requests may be admitted beside the decode rows); the requests that end with those tokens get
    no row."""
    for request in continuing:
        request.output_token_ids.append(PLACEHOLDER)
        request.token_pending = True
    ending = {id(r) for r in requests} - {id(r) for r in continuing}
    return engine._launch(ahead=(launched.to_sample, launched.pending.chosen), ending=ending)


def decode_input_ids(decode: list[Request], sampled: list[Request], chosen: torch.Tensor) -> torch.Tensor | None:
    """The device input ids of a step launched ahead, in the order of its decode rows (`decode`, every one
    of them among the rows `sampled` of the step before, whose tokens `chosen` holds)."""
    if not decode:
        return None
    if len(decode) == len(sampled) and all(a is b for a, b in zip(decode, sampled, strict=True)):
        return chosen
    row_of = {id(r): row for row, r in enumerate(sampled)}
    return chosen.index_select(0, to_device([row_of[id(r)] for r in decode], torch.long, chosen.device))
