"""Random traffic over a small rank pool with asynchronous slot loads, prefetch, evictions, the prefix
cache and aborts, every step's indices checked on the host (LORAPLEX_CHECK_STEP_INPUTS): every request that
finishes has its adapter's tokens run alone. This is the CUDA admission path (a slot that is still loading
makes its request wait) driven on the CPU with a fake copy event."""

from __future__ import annotations

import random

import pytest

from server.model.lora import max_adapter_rank
from tests.unit.engine_helpers import make_engine
from tests.unit.test_adapter_prefetch import SlowCopy
from tests.unit.test_continuous_batching import PROMPTS, greedy, run_alone
from tests.unit.test_graph_prefill import replaying
from tests.unit.test_mixed_batch_oracle import adapter_refs


@pytest.mark.parametrize("replay", [False, True], ids=["eager", "graph-replay"])
def test_random_traffic_over_a_small_pool_with_async_loads_matches_running_alone(
        tiny_llama_dir, tiny_adapters, monkeypatch, replay):
    """`graph-replay`: decode steps, and prefill chunks short enough to ride them, go through the decode
    graph's static inputs (tests.unit.test_graph_prefill.EagerReplay), as on CUDA."""
    monkeypatch.setattr("server.engine.runner.CHECK_STEP_INPUTS", True)
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    choices = [None, *refs.values()]
    # A 16-unit pool: ranks 4, 8 and 2 take 8-unit blocks (two fit at once), rank 16 takes all of it.
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=96, max_slots=1, max_rank=16, max_batch_size=6,
                         enable_prefix_caching=True)
    engine.lora_slots._copy_stream = object()  # asynchronous copies: prefetch on, loading slots wait
    if replay:
        replaying(engine, max_rows=16)
        engine.scheduler.graph_rows = engine.runner.graph_prefill_rows
    rng = random.Random(5)

    def slow_load(slot, offset, weights):
        engine.lora_slots._copy_into(slot, offset, max_adapter_rank(weights), weights)
        return SlowCopy(rng.randint(0, 3))

    engine.slot_table._load_fn = slow_load
    submitted, aborted = [], set()
    for step in range(160):
        if step < 120 and rng.random() < 0.45:
            prompt = PROMPTS[rng.randrange(3)] + ([rng.randrange(1, 200)] if rng.random() < 0.5 else [])
            request = greedy(prompt, rng.randint(2, 9), rng.choice(choices))
            engine.add_request(request)
            submitted.append(request)
        if submitted and rng.random() < 0.05:
            victim = rng.choice(submitted)
            if not victim.is_finished and engine.abort(victim.request_id) is not None:
                aborted.add(victim.request_id)
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.slot_table.num_loads > len(refs)  # adapters were evicted and loaded again
    assert engine.scheduler.prefix_hit_tokens > 0  # some prompts came back to the same adapter
    assert not replay or engine.runner.graphs.chunk_rows > 0  # prefill chunks rode the replay
    finished = [r for r in submitted if r.request_id not in aborted]
    assert len(finished) > 30
    for request in finished:
        alone = greedy(request.prompt_token_ids, request.params.max_tokens, request.adapter)
        assert request.output_token_ids == run_alone(tiny_llama_dir, alone, max_rank=16), request.request_id
