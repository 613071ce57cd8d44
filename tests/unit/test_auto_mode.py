"""`--lora-mode auto`: merge decisions from measured costs, and no drain when other demand arrives."""

from __future__ import annotations

from server.engine.auto_mode import ARRIVAL_WINDOW, AutoModePolicy
from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine
from tests.unit.test_mixed_batch_oracle import adapter_refs


def test_policy_merges_once_to_learn_then_only_when_it_pays():
    policy = AutoModePolicy()
    assert policy.should_merge("a", remaining_steps=8)  # nothing measured: take the chance, measure it
    assert not policy.should_merge("a", remaining_steps=1)
    policy.record_swap(0.200)  # 200 ms a swap
    policy.record_step(merged=False, seconds=0.0138)
    policy.record_step(merged=True, seconds=0.0119)  # saves 1.9 ms a step
    assert not policy.should_merge("a", remaining_steps=100)  # 190 ms saved < 400 ms of swaps
    assert policy.should_merge("a", remaining_steps=500)  # 950 ms saved > 400 ms
    policy.record_step(merged=True, seconds=0.0140)  # merged got no cheaper: the gain shrinks toward 0
    assert policy.gain_per_step_s() < 0.0019


def test_lasting_demand_merges_once_the_steps_spent_unmerged_pay_for_the_swaps():
    policy = AutoModePolicy(unmerged_step_s=0.0060, merged_step_s=0.0041, swap_s=0.2)
    assert not policy.should_merge("a", remaining_steps=64, lasted_steps=100)  # 190 ms lost so far < 400 ms
    assert policy.should_merge("a", remaining_steps=64, lasted_steps=250)  # steady traffic: 475 ms > 400 ms


def test_steady_arrivals_merge_at_once_and_mixed_ones_never_do():
    policy = AutoModePolicy(unmerged_step_s=0.0060, merged_step_s=0.0041, swap_s=0.2)
    for _ in range(ARRIVAL_WINDOW - 1):
        policy.record_arrival(("a", 1))
    assert not policy.is_steady(("a", 1))  # one arrival short
    policy.record_arrival(("a", 1))
    assert policy.is_steady(("a", 1)) and not policy.is_steady(("b", 1))
    assert policy.should_merge(("a", 1), remaining_steps=8)  # the ski-rental rule alone would wait
    policy.arrivals.popleft()
    assert not policy.should_merge(("a", 1), remaining_steps=8)  # 15 arrivals: not steady yet
    policy.record_arrival(("b", 1))
    assert not policy.is_steady(("a", 1)) and not policy.is_steady(("b", 1))
    for _ in range(ARRIVAL_WINDOW):
        policy.record_arrival(("b", 1))
    policy.on_idle()  # a pause: the arrivals before it say nothing about what comes next
    assert not policy.is_steady(("b", 1))
    no_gain = AutoModePolicy(unmerged_step_s=0.004, merged_step_s=0.0041, swap_s=0.2)
    assert not no_gain.should_merge("a", remaining_steps=64, lasted_steps=500)  # the cost rule sees no gain
    for _ in range(ARRIVAL_WINDOW):
        no_gain.record_arrival("a")
    # Steady: merged anyway. A merged step is the unmerged one less its LoRA ops, so "no faster" is noise,
    # and believing it would keep auto unmerged for good: merged steps are the only way to measure again.
    assert no_gain.should_merge("a", remaining_steps=8)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_recent_arrivals_for_other_adapters_cap_how_long_single_demand_is_trusted_to_last():
    """Single demand amid mixed arrivals (requests reaching the engine one by one, e.g. as their weights
    load from disk) ends at the next arrival for another adapter, not when its own tokens run out."""
    clock = FakeClock()
    policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.02, clock=clock)
    assert policy.other_arrival_in_s("a") is None
    assert policy.should_merge("a", remaining_steps=30)  # nothing says it ends: 30 x 2 ms > 2 x 20 ms
    for key in ("a", "b", "c", "a"):
        policy.record_arrival(key)
        clock.now += 0.010
    # 2 arrivals for others in 40 ms: the next expected in 20 ms, about 3 steps: 6 ms saved < 40 ms
    assert abs(policy.other_arrival_in_s("a") - 0.020) < 1e-12
    assert not policy.should_merge("a", remaining_steps=30)
    assert policy.should_merge("a", remaining_steps=30, lasted_steps=25)  # it has lasted: 50 ms > 40 ms
    clock.now += 0.5  # no arrival for half a second: the estimate grows by itself (270 ms, capped at 30 steps)
    assert policy.should_merge("a", remaining_steps=30)
    policy.on_idle()
    assert policy.other_arrival_in_s("a") is None


def test_a_long_request_between_short_ones_for_other_adapters_stays_unmerged(tiny_llama_dir, tiny_adapters):
    """One long request, and every fourth step a short one for another adapter that finishes two steps
    later: half the time all demand is the long one's adapter, with 40+ tokens left. Its tokens alone
    (40 x 2 ms > 2 x 20 ms) made auto merge then, and the next short request unmerge: two swaps for
    each. The arrivals say another adapter comes every 24 ms (4 steps: 8 ms saved), so it stays unmerged."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    clock = FakeClock()
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    engine.auto_policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.02, clock=clock)
    engine.auto_policy.record_step = lambda merged, seconds, rows=0: None  # fixed costs: a deterministic decision
    engine.auto_policy.record_swap = lambda seconds: None
    long_one = _greedy([3, 9, 27], 60, refs["all-r8"])
    engine.add_request(long_one)
    single_steps = 0
    for step in range(40):
        if step % 4 == 0:
            engine.add_request(_greedy([5 + step, 9, 27], 2, refs[("attn-r4", "ko-r16")[step // 4 % 2]]))
        engine.step()
        clock.now += 0.006
        assert not engine.merged_active, step
        single_steps += len({r.adapter_key for r in engine.scheduler.running}) == 1
    assert single_steps >= 15  # the case this is about did occur
    while engine.has_unfinished():
        engine.step()
    assert len(long_one.output_token_ids) == 60


def test_engine_times_a_warm_up_swap_at_start_and_leaves_the_weights_pristine(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    assert engine.auto_policy.swap_s > 0.0
    assert engine.swapper.current is None and engine.swapper.is_pristine()


def test_the_gain_compares_steps_of_the_same_batch_size():
    """Merged steps measured at a load's tail (2 rows) against unmerged ones at full batch (32 rows) would
    credit merging with the batch's size; per size, the gain is what the LoRA ops cost."""
    policy = AutoModePolicy()
    for _ in range(20):
        policy.record_step(merged=False, seconds=0.0060, rows=32)
        policy.record_step(merged=True, seconds=0.0020, rows=2)
    assert abs(policy.gain_per_step_s(32) - 0.0040) < 1e-9  # only the two sizes' global figures compare
    for _ in range(20):
        policy.record_step(merged=True, seconds=0.0055, rows=30)
    assert abs(policy.gain_per_step_s(32) - 0.0005) < 1e-9  # 32 rows unmerged against 30 merged: one bucket
    assert policy.gain_per_step_s(2) > 0.0  # no unmerged step of 2 rows: the global figures


def test_prior_gain_before_a_merged_step_is_measured():
    policy = AutoModePolicy(swap_s=0.01)
    policy.record_step(merged=False, seconds=0.010)
    assert abs(policy.gain_per_step_s() - 0.001) < 1e-12  # 10% of the unmerged step
    assert policy.should_merge("a", remaining_steps=21) and not policy.should_merge("a", remaining_steps=19)


def _greedy(prompt, n, adapter):
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def test_other_demand_unmerges_at_the_next_step_without_a_drain(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    # Step-exact (each step() one scheduled step): no step runs ahead of its tokens.
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128,
                         async_scheduling=False)
    engine.auto_policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.001)
    engine.auto_policy.record_step = lambda merged, seconds, rows=0: None  # fixed costs: 30 steps x 2 ms pay 2 x 1 ms
    engine.auto_policy.record_swap = lambda seconds: None
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


def test_steady_single_adapter_traffic_merges_once_its_steps_pay_for_the_swaps(tiny_llama_dir, tiny_adapters):
    """Short requests that keep coming for one adapter: each has only a few tokens left, so only the
    steps the demand has already lasted can justify the swaps (2 ms saved a step against 2 x 50 ms)."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    engine.auto_policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.05)
    engine.auto_policy.record_step = lambda merged, seconds, rows=0: None  # fixed costs: a deterministic decision
    engine.auto_policy.record_swap = lambda seconds: None
    engine.auto_policy.record_arrival = lambda key: None  # the ski-rental rule alone, not the arrivals
    for i in range(2):
        engine.add_request(_greedy([5 + i, 17, 33], 4, refs["all-r8"]))
    merged_at = None
    for step in range(80):
        for output in engine.step():
            if output.finished:
                engine.add_request(_greedy([7, 17, 33 + step], 4, refs["all-r8"]))
        if engine.merged_active and merged_at is None:
            merged_at = step
    assert merged_at is not None and 45 <= merged_at <= 55, merged_at


def test_sixteen_arrivals_for_one_adapter_merge_at_the_next_step(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    engine.auto_policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.05)
    requests = [_greedy([5 + i, 17, 33], 4, refs["all-r8"]) for i in range(ARRIVAL_WINDOW)]
    for r in requests[:-1]:
        engine.add_request(r)
    engine.step()
    assert not engine.merged_active  # 15 arrivals, 4 tokens left each: 8 ms saved < 100 ms of swaps
    engine.add_request(requests[-1])
    engine.step()
    assert engine.merged_active
    while engine.has_unfinished():
        engine.step()
    alone = make_engine(tiny_llama_dir, lora_mode="unmerged", max_slots=4, max_rank=16, kv_cache_blocks=128)
    reference = _greedy([5, 17, 33], 4, refs["all-r8"])
    alone.add_request(reference)
    while alone.has_unfinished():
        alone.step()
    assert requests[0].output_token_ids == reference.output_token_ids


def test_arrivals_before_the_engine_went_idle_do_not_count_as_steady(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    engine.auto_policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.05)
    for i in range(ARRIVAL_WINDOW):
        engine.add_request(_greedy([5 + i, 17, 33], 1, refs["all-r8"]))
    while engine.has_unfinished():
        engine.step()
    assert not engine.auto_policy.arrivals  # idle: the window starts over
    engine.add_request(_greedy([5, 17, 33], 4, refs["all-r8"]))
    engine.step()
    assert not engine.merged_active  # one request after a pause is not steady traffic (4 x 2 ms < 2 x 50 ms)
