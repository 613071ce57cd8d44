"""Asynchronous slot loads: a request whose adapter is still being copied waits while the batch keeps
decoding and requests behind it go first; outputs equal running alone. A fake slow copy stands for the
CUDA side stream: its 'event' reports done only after a set number of polls."""

from __future__ import annotations

from server.engine.rank_pool import MIN_BLOCK
from server.engine.slot_table import SLOT_LOADING, SlotTable
from server.model.lora import LoraSlots, max_adapter_rank
from tests.unit.engine_helpers import make_engine
from tests.unit.test_continuous_batching import PROMPTS, greedy, run_alone
from tests.unit.test_mixed_batch_oracle import adapter_refs


class SlowCopy:
    """A copy that is done after `polls` queries (a torch.cuda.Event stand-in)."""

    def __init__(self, polls: int):
        self.polls_left = polls

    def query(self) -> bool:
        self.polls_left -= 1
        return self.polls_left < 0

    def synchronize(self) -> None:
        self.polls_left = 0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_slot_table_answers_loading_until_the_copy_is_done():
    copies = []

    def load(slot, offset, weights):
        copies.append((slot, weights))
        return SlowCopy(3)

    loaded = []
    table = SlotTable(2 * MIN_BLOCK, load, on_loaded=loaded.append, clock=FakeClock())
    assert table.acquire(("a", 1), "wa") == SLOT_LOADING
    assert table.is_loading(("a", 1)) and table.users(("a", 1)) == 0  # (each check polls the copy)
    assert table.acquire(("a", 1), "wa") == SLOT_LOADING  # still copying
    assert len(copies) == 1  # one copy, not one per attempt
    slot = table.acquire(("a", 1), "wa")
    assert slot == 0 and table.users(("a", 1)) == 1 and loaded == [1.0]  # issue to observed completion (fake clock)


def test_acquire_with_wait_blocks_until_the_copy_is_done():
    table = SlotTable(1 * MIN_BLOCK, lambda slot, offset, w: SlowCopy(100))
    assert table.acquire(("a", 1), "wa", wait=True) == 0  # for rows already running (auto mode's unmerge)
    assert table.users(("a", 1)) == 1


def test_loading_slot_is_never_a_victim():
    table = SlotTable(1 * MIN_BLOCK, lambda slot, offset, w: SlowCopy(5))
    assert table.acquire(("a", 1), "wa") == SLOT_LOADING
    assert table.acquire(("b", 1), "wb") is None  # the only slot is loading for a: not evictable
    assert table.blocking_keys("wb") == []  # nothing to drain: the only block is loading
    assert not table.prefetch(("b", 1), "wb")


def test_synchronous_loads_behave_as_before():
    table = SlotTable(2 * MIN_BLOCK, lambda slot, offset, w: None)
    assert table.acquire(("a", 1), "wa") == 0
    assert table.acquire(("b", 1), "wb") == 1
    assert table.acquire(("c", 1), "wc") is None  # both in use
    table.release(("a", 1))
    assert table.acquire(("c", 1), "wc") == 0 and table.num_loads == 3


def test_prefetch_takes_a_free_slot_without_a_user():
    table = SlotTable(2 * MIN_BLOCK, lambda slot, offset, w: SlowCopy(1))
    assert table.prefetch(("a", 1), "wa")
    assert not table.prefetch(("a", 1), "wa")  # already loading
    assert table.users(("a", 1)) == 0 and table.num_loading == 1
    assert table.acquire(("a", 1), "wa") == SLOT_LOADING
    assert table.acquire(("a", 1), "wa") == 0


def _slow_engine(model_dir, polls: int, **kw):
    """An engine whose slot copies complete only after `polls` polls, as on a CUDA copy stream."""
    engine = make_engine(model_dir, kv_cache_blocks=128, **kw)
    issued = []

    def slow_load(slot, offset, weights):
        engine.lora_slots._copy_into(slot, offset, max_adapter_rank(weights), weights)  # the real copy (CPU) ...
        issued.append(slot)
        return SlowCopy(polls)  # ... reported done only later

    engine.slot_table._load_fn = slow_load
    return engine, issued


def test_request_waiting_for_its_copy_does_not_stall_the_batch_or_the_queue(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    # Step-exact (each step() one scheduled step): no step runs ahead of its tokens.
    engine, _ = _slow_engine(tiny_llama_dir, polls=3, max_slots=2, async_scheduling=False)
    running = greedy(PROMPTS[0], 10)  # base model: needs no slot
    engine.add_request(running)
    engine.step()
    cold = greedy(PROMPTS[1], 6, refs["attn-r4"])
    behind = greedy(PROMPTS[2], 6)  # queued after the cold request
    engine.add_request(cold)
    engine.add_request(behind)
    tokens_before = len(running.output_token_ids)
    engine.step()
    assert cold.status.value == "waiting" and behind.status.value == "running"  # behind went first
    assert len(running.output_token_ids) == tokens_before + 1  # the batch kept decoding
    waited = 1
    while cold.status.value == "waiting":
        engine.step()
        waited += 1
    assert waited == 4  # admitted at the first step after its copy reported done
    while engine.has_unfinished():
        engine.step()
    assert cold.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[1], 6, refs["attn-r4"]))
    assert running.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[0], 10))


def test_prefetch_starts_copies_for_waiting_requests_while_the_batch_is_full(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine, issued = _slow_engine(tiny_llama_dir, polls=1, max_slots=2, max_batch_size=1, async_scheduling=False)
    engine.lora_slots._copy_stream = object()  # pretend the copies are asynchronous (CUDA) to turn prefetch on
    first = greedy(PROMPTS[0], 8)
    engine.add_request(first)
    engine.step()
    queued = greedy(PROMPTS[1], 4, refs["ko-r16"])
    engine.add_request(queued)
    engine.step()  # the batch is full (one row): the queued request is not admitted, its copy starts
    assert queued.status.value == "waiting" and issued == [0]
    while engine.has_unfinished():
        engine.step()
    assert issued == [0]  # admitted on the prefetched slot, no second copy
    assert queued.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[1], 4, refs["ko-r16"]))


def test_cpu_engine_loads_synchronously_and_never_prefetches(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=2, max_batch_size=1)
    assert not engine.lora_slots.is_async
    engine.add_request(greedy(PROMPTS[0], 4))
    engine.step()
    engine.add_request(greedy(PROMPTS[1], 4, refs["ko-r16"]))
    engine.step()
    assert engine.slot_table.num_loads == 0  # no lookahead copy on the CPU
    while engine.has_unfinished():
        engine.step()
    assert engine.slot_table.num_loads == 1


def test_gpu_tier_loads_and_evictions_are_counted(tiny_llama_dir, tiny_adapters):
    from server import metrics

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=1, max_rank=16)  # a 16-unit pool
    labels = {"model_name": engine.model_name, "tier": "gpu"}

    def sample(name):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    loads, evictions = sample("loraplex_adapter_loads_total"), sample("loraplex_adapter_evictions_total")
    for name in ("attn-r4", "ko-r16", "attn-r4"):
        engine.add_request(greedy(PROMPTS[0], 2, refs[name]))
        while engine.has_unfinished():
            engine.step()
    assert sample("loraplex_adapter_loads_total") == loads + 3
    assert sample("loraplex_adapter_evictions_total") == evictions + 2
    # attn-r4 (rank 4) takes one 8-unit block: a row of A per output slice and one of B in every LoRA linear
    assert sample("loraplex_adapter_bytes_resident") == 8 * LoraSlots.rank_nbytes(engine.model)



def test_a_prefetched_adapter_nobody_asks_for_becomes_evictable_once_its_copy_is_done():
    """A prefetch whose request was aborted is never acquired: its finished copy must not hold the block."""
    table = SlotTable(2 * MIN_BLOCK, lambda slot, offset, w: SlowCopy(2), rank_of=lambda w: 2 * MIN_BLOCK)
    assert table.prefetch(("a", 1), "wa")
    assert table.acquire(("b", 1), "wb") is None  # a's copy is still in flight: not a victim
    assert table.acquire(("b", 1), "wb") is None
    assert table.acquire(("b", 1), "wb") == SLOT_LOADING  # a's copy is done: a was evicted for b
    assert table.slot_of(("a", 1)) is None
