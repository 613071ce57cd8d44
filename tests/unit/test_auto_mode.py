"""`--lora-mode auto`: merge decisions from measured costs, and no drain when other demand arrives."""

from __future__ import annotations

from server.engine.auto_mode import AutoModePolicy
from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine
from tests.unit.test_mixed_batch_oracle import adapter_refs


def test_policy_merges_once_to_learn_then_only_when_it_pays():
    policy = AutoModePolicy()
    assert policy.should_merge(remaining_steps=8)  # nothing measured: take the chance, measure it
    assert not policy.should_merge(remaining_steps=1)
    policy.record_swap(0.200)  # 200 ms a swap
    policy.record_step(merged=False, seconds=0.0138)
    policy.record_step(merged=True, seconds=0.0119)  # saves 1.9 ms a step
    assert not policy.should_merge(remaining_steps=100)  # 190 ms saved < 400 ms of swaps
    assert policy.should_merge(remaining_steps=500)  # 950 ms saved > 400 ms
    policy.record_step(merged=True, seconds=0.0140)  # merged got no cheaper: the gain shrinks toward 0
    assert policy.gain_per_step_s < 0.0019


def test_prior_gain_before_a_merged_step_is_measured():
    policy = AutoModePolicy(swap_s=0.01)
    policy.record_step(merged=False, seconds=0.010)
    assert abs(policy.gain_per_step_s - 0.001) < 1e-12  # 10% of the unmerged step
    assert policy.should_merge(remaining_steps=21) and not policy.should_merge(remaining_steps=19)


def _greedy(prompt, n, adapter):
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def test_other_demand_unmerges_at_the_next_step_without_a_drain(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    long_one = _greedy([5, 17, 33, 100, 7], 30, refs["all-r8"])
    engine.add_request(long_one)
    for _ in range(3):
        engine.step()
    assert engine.merged_active and engine.swapper.current == ("all-r8", 1)
    newcomer = _greedy([44, 55, 66, 77], 6, refs["attn-r4"])
    engine.add_request(newcomer)
    engine.step()  # unmerges first, then admits and prefills the newcomer in this very step
    assert not engine.merged_active and engine.swapper.current is None
    assert len(newcomer.output_token_ids) == 1 and not long_one.is_finished  # no drain happened
    assert long_one.slot >= 0  # the running request moved to a slot
    while engine.has_unfinished():
        engine.step()
    assert len(long_one.output_token_ids) == 30
    alone = make_engine(tiny_llama_dir, lora_mode="unmerged", max_slots=4, max_rank=16, kv_cache_blocks=128)
    reference = _greedy([44, 55, 66, 77], 6, refs["attn-r4"])
    alone.add_request(reference)
    while alone.has_unfinished():
        alone.step()
    assert newcomer.output_token_ids == reference.output_token_ids


def test_mixed_demand_never_merges(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    for i, name in enumerate(("all-r8", "attn-r4", "all-r8", "ko-r16")):
        engine.add_request(_greedy([3 + i, 9, 27], 8, refs[name]))
    while engine.has_unfinished():
        engine.step()
        assert not engine.merged_active
    assert engine.swapper.current is None and engine.swapper.is_pristine()
