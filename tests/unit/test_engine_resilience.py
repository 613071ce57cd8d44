"""One request must never take the engine down: identity bookkeeping, single-flight adapter loads,
and a watchdog that injects a fault at every stage of a step (issue 9, defect 1)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from adapters_store import BaseModelSpec, load_adapter_dir
from server.engine import merge_switch, overlap
from server.engine.async_engine import AsyncEngine
from server.engine.request import AdapterRef, FinishReason, Request, SamplingParams
from tests.unit.engine_helpers import make_engine


def _greedy(prompt, n, adapter=None):
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def _twin_refs(model_dir, adapter_dir):
    """Two refs to the same adapter name and version whose weights are distinct objects (as after a
    concurrent first use or an evicted-then-reloaded adapter)."""
    from transformers import AutoConfig

    spec = BaseModelSpec.from_hf_config(AutoConfig.from_pretrained(model_dir))
    return [AdapterRef("twin", 1, load_adapter_dir(adapter_dir, spec, 16)) for _ in range(2)]


def test_requests_compare_by_identity_not_by_value(tiny_llama_dir, tiny_adapters):
    first, second = _twin_refs(tiny_llama_dir, tiny_adapters["all-r8"])
    a, b = _greedy([5, 6, 7], 4, first), _greedy([5, 6, 7], 4, second)
    b.request_id = a.request_id  # even the same id must not make two requests the same request
    assert a != b and a == a
    assert a not in [b] and len({a, b}) == 2


def test_aborting_a_twin_request_keeps_the_engine_running(tiny_llama_dir, tiny_adapters):
    first, second = _twin_refs(tiny_llama_dir, tiny_adapters["all-r8"])
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_slots=2)
    keep, drop = _greedy([5, 6, 7], 6, first), _greedy([5, 6, 7], 6, second)
    engine.add_request(keep)
    engine.add_request(drop)
    engine.step()
    output = engine.abort(drop.request_id)
    assert output.finished and output.finish_reason is FinishReason.ABORT
    while engine.has_unfinished():
        engine.step()
    assert len(keep.output_token_ids) == 6
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks


def test_concurrent_first_use_loads_one_version_once(tmp_path, tiny_llama_dir, tiny_adapters):
    from transformers import AutoConfig

    from adapters_store import AdapterStore
    from server.registry import AdapterRegistry

    spec = BaseModelSpec.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    store = AdapterStore(tmp_path / "store", spec, max_rank=16, max_bytes=1 << 26)
    store.put_dir("shared", tiny_adapters["all-r8"])
    registry = AdapterRegistry(store, max_cpu_adapters=4)
    loads = []
    original = store.load_weights
    gate = threading.Barrier(8)

    def counting_load(record):
        loads.append(record.version)
        return original(record)

    store.load_weights = counting_load
    refs = [None] * 8

    def resolve(i):
        gate.wait()
        refs[i] = registry.resolve("shared")

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1]
    assert all(ref.weights is refs[0].weights for ref in refs)


STAGES = {
    "schedule": lambda e: (e.scheduler, "schedule"),
    "prefill": lambda e: (e.runner, "prefill"),
    "decode": lambda e: (e.runner, "decode"),
    "postprocess": lambda e: (e, "_postprocess"),
    "record_state": lambda e: (e, "_record_state"),
    "swap": lambda e: (merge_switch, "maybe_swap"),
    "abort": lambda e: (e, "abort"),
    "sample": lambda e: (e.sampler, "sample_async"),
    "launch_ahead": lambda e: (overlap, "launch_ahead"),
}


@pytest.mark.parametrize("stage", STAGES)
def test_watchdog_a_fault_at_any_stage_fails_requests_not_the_loop(tiny_llama_dir, stage, monkeypatch):
    """Inject one exception at `stage`; the affected requests finish with an error (or are aborted),
    the loop keeps serving, and the next request runs to the end."""
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    armed = threading.Event()

    def inject(real):
        def faulty(*args, **kwargs):
            if armed.is_set():
                armed.clear()
                raise RuntimeError(f"injected fault in {stage}")
            return real(*args, **kwargs)

        return faulty

    owner, name = STAGES[stage](engine)
    monkeypatch.setattr(owner, name, inject(getattr(owner, name)))
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        async def victim():
            if stage != "abort":
                armed.set()
                return [o async for o in async_engine.generate(_greedy([9, 8, 7, 6], 8))]
            stream = async_engine.generate(_greedy([9, 8, 7, 6], 30))
            first = await stream.__anext__()
            armed.set()
            await stream.aclose()  # the disconnect path runs the faulty abort
            return [first]

        async def survivor():
            return [o async for o in async_engine.generate(_greedy([1, 2, 3], 5))]

        async def scenario():
            victim_outputs = await asyncio.wait_for(victim(), timeout=60)
            for _ in range(100):  # the abort is handled on the engine thread
                if not engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            return victim_outputs, await asyncio.wait_for(survivor(), timeout=60)

        victim_outputs, survivor_outputs = asyncio.run(scenario())
        assert not armed.is_set()  # the fault really fired
        if stage != "abort":
            assert victim_outputs[-1].finished and victim_outputs[-1].error is not None
        assert survivor_outputs[-1].finished and survivor_outputs[-1].completion_tokens == 5
        assert survivor_outputs[-1].error is None
        assert async_engine.is_alive()
    finally:
        async_engine.shutdown()
    assert not engine.has_unfinished()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks


# the engine thread dies of the error on purpose (the test is what the streams see then)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unrecoverable_loop_fails_open_streams_instead_of_hanging(tiny_llama_dir, monkeypatch):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)

    def broken(*args, **kwargs):
        raise RuntimeError("broken beyond repair")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    monkeypatch.setattr(engine, "fail_all", broken)  # the recovery itself fails
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        async def run():
            return [o async for o in async_engine.generate(_greedy([1, 2, 3], 5))]

        outputs = asyncio.run(asyncio.wait_for(run(), timeout=30))
        assert outputs[-1].finished and "engine stopped" in outputs[-1].error
        assert not async_engine.is_alive()
    finally:
        async_engine.shutdown()
