"""Settings.prefill_hold_steps: beside a running decode batch, waiting prompts are held back (at most that many
steps in a row) so that several share one prefill step, and never when holding gains nothing: no decode batch,
the prompts already fill the step's prefill budget or the batch's free rows. The real Scheduler, no model."""

from __future__ import annotations

import torch

from server.engine.kv_cache import KVCache
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Admission, Scheduler

PROMPT_LEN = 8


def scheduler(hold_steps: int, max_batch_size: int = 16, budget: int = 64) -> Scheduler:
    cache = KVCache(1, 512, 1, 4, torch.float32, torch.device("cpu"))
    return Scheduler(cache, max_batch_size, budget, lambda r: Admission.ADMIT, lambda r: None,
                     hold_steps=hold_steps)


def add(sched: Scheduler, count: int, max_tokens: int = 100) -> list[Request]:
    requests = [Request([1] * PROMPT_LEN, SamplingParams(max_tokens=max_tokens)) for _ in range(count)]
    for request in requests:
        sched.add(request)
    return requests


def step(sched: Scheduler) -> tuple[int, int]:
    """Schedule and pretend to run one step: (prompts admitted, decode rows)."""
    batch = sched.schedule()
    for request, chunk in batch.prefill:
        request.num_computed_tokens += chunk
    for request in batch.decode + [r for r, _ in batch.prefill if not r.is_prefilling]:
        request.output_token_ids.append(2)
        request.num_computed_tokens = request.num_tokens - 1
    return len(batch.prefill), len(batch.decode)


def decoding(sched: Scheduler, count: int) -> None:
    add(sched, count)
    assert step(sched) == (count, 0)  # no decode batch: admitted at once, whatever hold_steps says


def test_prompts_beside_a_decode_batch_wait_at_most_hold_steps_then_go_together():
    sched = scheduler(hold_steps=3)
    decoding(sched, 4)
    add(sched, 1)
    assert [step(sched) for _ in range(3)] == [(0, 4)] * 3  # held three steps, the decode batch runs
    add(sched, 2)  # more arrive while the first waits: the first's count goes on
    assert step(sched) == (3, 4)  # the hold is over: all three share one step
    add(sched, 1)
    assert step(sched) == (0, 7)  # a new hold starts


def test_no_hold_without_the_setting():
    sched = scheduler(hold_steps=0)
    decoding(sched, 4)
    add(sched, 1)
    assert step(sched) == (1, 4)


def test_prompts_that_fill_the_prefill_budget_go_at_once():
    sched = scheduler(hold_steps=8, budget=3 * PROMPT_LEN)
    decoding(sched, 3)
    add(sched, 2)
    assert step(sched) == (0, 3)  # 16 tokens of a 24-token budget: held
    add(sched, 1)
    assert step(sched) == (3, 3)  # 24: the step cannot take more, nothing to wait for


def test_prompts_that_fill_the_free_rows_go_at_once():
    sched = scheduler(hold_steps=8, max_batch_size=6)
    decoding(sched, 4)
    add(sched, 1)
    assert step(sched) == (0, 4)
    add(sched, 1)
    assert step(sched) == (2, 4)  # two waiting for two free rows


def test_a_chunked_prompt_in_progress_is_never_held():
    sched = scheduler(hold_steps=8, budget=12)
    decoding(sched, 1)
    long = add(sched, 1)[0]
    long.prompt_token_ids = [1] * (3 * PROMPT_LEN)  # two chunks of the 12-token budget
    assert [step(sched) for _ in range(2)] == [(1, 1)] * 2  # it fills the budget: no hold, nor between chunks
    assert not long.is_prefilling
    add(sched, 1)
    assert step(sched) == (0, 2)  # a short one beside the two decoding is held
