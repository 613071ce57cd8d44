"""Continuous batching, preemption, cancellation and adapter replacement lose no request and never
apply the wrong adapter."""

from __future__ import annotations

import torch

from server.engine.rank_pool import block_size
from server.engine.request import AdapterRef, FinishReason, Request, SamplingParams
from server.model.lora import max_adapter_rank
from tests.unit.engine_helpers import make_engine, record_preemptions
from tests.unit.test_mixed_batch_oracle import adapter_refs

PROMPTS = [[5, 17, 33, 100, 7], [44, 55, 66, 77, 88, 99, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [200, 201], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10, 20, 30]]
LENGTHS = [12, 5, 20, 9, 15]


def greedy(prompt, n, adapter=None):
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def run_alone(model_dir, request, **kw):
    engine = make_engine(model_dir, kv_cache_blocks=128, **kw)
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    return request.output_token_ids


def test_requests_joining_at_different_steps_match_running_alone(tiny_llama_dir):
    alone = [run_alone(tiny_llama_dir, greedy(p, n)) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128)
    requests = [greedy(p, n) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    arrivals = {0: [0], 2: [1, 2], 3: [3], 7: [4]}
    step, batch_sizes = 0, []
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            engine.add_request(requests[i])
        batch_sizes.append(engine.num_running)
        engine.step()
        step += 1
    assert max(batch_sizes) >= 3  # they really overlapped
    assert [r.output_token_ids for r in requests] == alone
    assert all(len(r.output_token_ids) == n for r, n in zip(requests, LENGTHS, strict=True))


def test_preemption_under_kv_pressure_loses_nothing(tiny_llama_dir):
    alone = [run_alone(tiny_llama_dir, greedy(p, 30)) for p in PROMPTS]
    # 10 blocks of 16 tokens cannot hold five sequences of up to ~47 tokens at once.
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=10)
    requests = [greedy(p, 30) for p in PROMPTS]
    for r in requests:
        engine.add_request(r)
    preempted = record_preemptions(engine)
    while engine.has_unfinished():
        engine.step()
    assert preempted
    assert [r.output_token_ids for r in requests] == alone
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks  # every block came back


def test_abort_frees_resources_and_others_continue(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_slots=2)
    keep = greedy(PROMPTS[0], 10, refs["attn-r4"])
    drop = greedy(PROMPTS[1], 50, refs["all-r8"])
    engine.add_request(keep)
    engine.add_request(drop)
    engine.step()
    engine.step()
    output = engine.abort(drop.request_id)
    assert output.finished and output.finish_reason is FinishReason.ABORT
    assert engine.slot_table.users(("all-r8", 1)) == 0
    while engine.has_unfinished():
        engine.step()
    assert keep.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[0], 10, refs["attn-r4"]))
    assert engine.abort("no-such-request") is None
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks


def test_replaced_adapter_version_keeps_running_on_its_own_weights(tiny_llama_dir, tiny_adapters):
    """v1 of 'task' is replaced by v2 while a v1 request runs: it finishes on v1; new ones use v2."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    v1 = AdapterRef("task", 1, refs["attn-r4"].weights)
    v2 = AdapterRef("task", 2, refs["ko-r16"].weights)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_slots=1, max_rank=16)  # room for one of them
    old = greedy(PROMPTS[3], 12, v1)
    engine.add_request(old)
    for _ in range(3):
        engine.step()
    new = greedy(PROMPTS[3], 12, v2)
    engine.add_request(new)  # only one slot: v2 waits until v1's request releases it
    waited_steps = 0
    while engine.has_unfinished():
        if new.status.value == "waiting":
            waited_steps += 1
        engine.step()
    assert waited_steps > 0
    assert old.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[3], 12, v1))
    assert new.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[3], 12, v2))
    assert old.output_token_ids != new.output_token_ids


def test_pool_size_caps_distinct_adapters_per_step(tiny_llama_dir, tiny_adapters):
    """A 16-unit pool: ranks 4, 8 and 2 take 8-unit blocks (two fit at once), rank 16 takes all of it."""
    refs = list(adapter_refs(tiny_llama_dir, tiny_adapters).values())
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=1, max_rank=16)
    requests = [greedy(PROMPTS[i % 5], 6, refs[i % 4]) for i in range(8)]
    for r in requests:
        engine.add_request(r)
    most = 0
    while engine.has_unfinished():
        engine.step()
        keys = {r.adapter_key for r in engine.scheduler.running}
        units = sum(block_size(max_adapter_rank(r.adapter.weights))
                    for r in {r.adapter_key: r for r in engine.scheduler.running}.values())
        assert units <= 16, f"{keys} take {units} units of a 16-unit pool"
        most = max(most, len(keys))
    assert most == 2
    assert all(len(r.output_token_ids) == 6 for r in requests)


def test_prompt_validation(tiny_llama_dir):
    import pytest

    from server.engine.request import SamplingError

    engine = make_engine(tiny_llama_dir, kv_cache_blocks=16, max_model_len=64)
    with pytest.raises(SamplingError, match="max_model_len"):
        engine.add_request(greedy([1] * 64, 4))
    with pytest.raises(SamplingError, match="temperature"):
        engine.add_request(Request([1, 2], SamplingParams(temperature=-1)))
    with pytest.raises(SamplingError, match="empty"):
        engine.add_request(greedy([], 4))
    assert not engine.has_unfinished()


def test_generation_stops_at_max_model_len(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=16, max_model_len=32)
    request = greedy([1] * 28, 100)
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    assert request.num_tokens == 32 and request.finish_reason is FinishReason.LENGTH


def test_out_of_memory_in_one_prefill_fails_only_that_request(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    survivor = greedy(PROMPTS[0], 8)
    engine.add_request(survivor)
    engine.step()  # survivor is decoding now
    doomed = greedy([7] * 40, 8)
    engine.add_request(doomed)
    prefill = engine.runner.prefill

    def failing_prefill(chunks):
        if any(r is doomed for r, _ in chunks):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return prefill(chunks)

    engine.runner.prefill = failing_prefill
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    doomed_out = [o for o in outputs if o.request_id == doomed.request_id]
    assert len(doomed_out) == 1 and doomed_out[0].finish_reason is FinishReason.ERROR
    assert "out of memory" in doomed_out[0].error
    assert survivor.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[0], 8))
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks


def test_engine_thread_survives_a_consumer_whose_event_loop_closed(tiny_llama_dir):
    """A client's event loop that closes mid-stream must not kill the engine thread."""
    import asyncio

    from server.engine.async_engine import AsyncEngine

    engine = AsyncEngine(make_engine(tiny_llama_dir, kv_cache_blocks=64))
    engine.start()
    try:
        async def first_output():
            stream = engine.generate(greedy(PROMPTS[0], 200))
            return await stream.__anext__()  # leave the stream open, then drop the loop

        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(first_output()).new_token_ids
        loop.close()

        async def full_run():
            return [o async for o in engine.generate(greedy(PROMPTS[1], 5))]

        outputs = asyncio.run(asyncio.wait_for(full_run(), timeout=60))
        assert outputs[-1].finished and outputs[-1].completion_tokens == 5
        assert engine.is_alive()
    finally:
        engine.shutdown()


def test_max_model_len_never_exceeds_the_cache(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=4, max_model_len=512)
    assert engine.max_model_len == 4 * engine.kv_cache.block_size
    request = greedy([3] * 40, 100)
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    assert request.finish_reason is FinishReason.LENGTH and request.num_tokens == engine.max_model_len


def test_equal_length_prompts_prefilled_together_match_running_alone(tiny_llama_dir):
    """Same-length fresh prompts share one batched attention call; chunked ones still attend to their cache."""
    prompts = [[i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6] for i in (3, 40, 90, 150)] + [list(range(1, 30))]
    alone = [run_alone(tiny_llama_dir, greedy(p, 6)) for p in prompts]
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_num_batched_tokens=40)
    requests = [greedy(p, 6) for p in prompts]
    for r in requests:
        engine.add_request(r)
    groups_seen = []
    fresh_groups = engine.runner._fresh_groups

    def spying_fresh_groups(seqs):
        groups = fresh_groups(seqs)
        groups_seen.extend(tuple(g.shape) for g in groups)
        return groups

    engine.runner._fresh_groups = spying_fresh_groups
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in requests] == alone
    assert (4, 7) in groups_seen  # the four 7-token prompts went through one batched call


def _step_beside_steady_traffic(engine, waiting, steady_adapters, max_steps: int) -> bool:
    """Step with a new request for each of `steady_adapters` arriving at every step, until `waiting`
    finishes or max_steps pass; then run what is left to the end. Returns whether `waiting` finished
    while the steady traffic still came."""
    for step in range(max_steps):
        for adapter in steady_adapters:
            engine.add_request(greedy(PROMPTS[step % 5], 6, adapter))
        engine.step()
        if waiting.is_finished:
            break
    finished_under_traffic = waiting.is_finished
    while engine.has_unfinished():
        engine.step()
    return finished_under_traffic


def test_waiting_adapter_is_not_starved_by_steady_traffic_to_a_resident_one(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=1, max_rank=16)  # room for one of them
    busy = [greedy(PROMPTS[0], 6, refs["attn-r4"]) for _ in range(2)]
    for r in busy:
        engine.add_request(r)
    engine.step()
    starved = greedy(PROMPTS[1], 4, refs["ko-r16"])
    engine.add_request(starved)
    assert _step_beside_steady_traffic(engine, starved, [refs["attn-r4"]], max_steps=60)
    assert len(starved.output_token_ids) == 4


def test_a_large_adapter_is_not_starved_by_steady_traffic_to_two_small_ones(tiny_llama_dir, tiny_adapters):
    """A 16-unit pool: rank-4 and rank-8 adapters take an 8-unit block each and fill it; the rank-16 one
    needs both gone at once, so draining only one of them would starve it."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=1, max_rank=16)
    for name in ("attn-r4", "all-r8"):
        engine.add_request(greedy(PROMPTS[0], 6, refs[name]))
    engine.step()
    large = greedy(PROMPTS[1], 4, refs["ko-r16"])
    engine.add_request(large)
    assert _step_beside_steady_traffic(engine, large, [refs["attn-r4"], refs["all-r8"]], max_steps=80)
    assert len(large.output_token_ids) == 4


def test_drained_adapter_serves_again_when_the_waiting_request_is_aborted(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=1, max_rank=16)  # room for one of them
    engine.add_request(greedy(PROMPTS[0], 3, refs["attn-r4"]))
    engine.step()
    blocked = greedy(PROMPTS[1], 4, refs["ko-r16"])
    engine.add_request(blocked)
    engine.step()  # blocked: no free slot, attn-r4 starts draining
    engine.abort(blocked.request_id)
    late = greedy(PROMPTS[2], 3, refs["attn-r4"])
    engine.add_request(late)
    for _ in range(20):
        engine.step()
        if late.is_finished:
            break
    assert late.is_finished and len(late.output_token_ids) == 3


def test_cpu_kv_cache_default_is_capped_but_holds_one_sequence():
    from server.engine.kv_cache import CPU_KV_CACHE_BYTES, choose_num_blocks

    cpu = torch.device("cpu")
    per_block = 1 << 20  # 1 MiB a block
    assert choose_num_blocks(None, 0.9, per_block, cpu, 32, 8192) == CPU_KV_CACHE_BYTES // per_block
    assert choose_num_blocks(None, 0.9, 64 << 20, cpu, 32, 8192) == 512  # one 8192-token sequence
    assert choose_num_blocks(None, 0.9, 1024, cpu, 2, 64) == 8  # small batches are not inflated
    assert choose_num_blocks(77, 0.9, per_block, cpu, 32, 8192) == 77
