"""The loraplex side of a run: an unmerged engine, then a merged engine, on the same NF4 model."""

from __future__ import annotations

import time
from typing import Any

from bench.build import build_engine, free_memory, gpu_mem_gib, kv_blocks_for, loaded_model, release_engine
from bench.ours import make_requests, measure_context, measure_generation, measure_swap
from bench.plan import Plan
from bench.results import Recorder
from server.model.loader import LOAD_PROGRESS


def run_ours(rec: Recorder, state: dict, plan: Plan, config, device) -> None:
    loaded = loaded_model(state["ours"], config)
    adapters = state["adapters"]
    vocab = config.vocab_size
    needs = plan.needs_s

    def requests(batch: int, refs: list, prompt_len: int = plan.prompt_len, max_tokens: int = plan.max_tokens):
        return lambda: make_requests(vocab, batch, prompt_len, max_tokens, refs)

    # Unmerged engine: room for 32 sequences at the longest context test.
    longest = max(max(plan.ctx_lens) + plan.ctx_max_tokens, plan.prompt_len + plan.max_tokens)
    engine = _start_engine(rec, "engine_unmerged", loaded, "unmerged", device, kv_blocks_for(32, longest))
    if engine is not None:
        for name, batch, refs in (
            ("base_b1", 1, [None]), ("base_b32", 32, [None]),
            ("unmerged1_b1", 1, adapters[:1]), ("unmerged1_b32", 32, adapters[:1]),
            ("mixed8_b32", 32, adapters[:8]), ("mixed32_b32", 32, adapters[:32]),
        ):
            make = requests(batch, refs)
            rec.measure("ours", name, lambda make=make: measure_generation(engine, make, device), needs["ours"])
        for ctx in plan.ctx_lens:
            make = requests(32, [None], prompt_len=ctx, max_tokens=plan.ctx_max_tokens)
            warm = requests(4, [None], prompt_len=ctx, max_tokens=2)
            rec.measure("ours", f"ctx{ctx}_b32",
                        lambda make=make, warm=warm: measure_context(engine, make, device, warm), needs["ctx"])
        _stop_engine(rec, engine, device)
    engine = None
    free_memory(device)

    engine = _start_engine(rec, "engine_merged", loaded, "merged", device,
                           kv_blocks_for(32, plan.prompt_len + plan.max_tokens))
    if engine is not None:
        for name, batch in (("merged1_b1", 1), ("merged1_b32", 32)):
            make = requests(batch, adapters[:1])
            rec.measure("ours", name, lambda make=make: measure_generation(engine, make, device), needs["ours"])
        rec.measure("ours", "swap", lambda: measure_swap(engine, adapters[1:3], plan.num_swaps, device))
        _stop_engine(rec, engine, device)


def _start_engine(rec: Recorder, name: str, loaded, mode: str, device, kv_blocks: int) -> Any:
    holder: dict[str, Any] = {}

    def start() -> dict:
        before = dict(LOAD_PROGRESS.finished)
        began = time.perf_counter()
        holder["engine"] = build_engine(loaded, mode, device, kv_blocks)
        return {"mode": mode, "kv_blocks": kv_blocks, "seconds": time.perf_counter() - began,
                "gpu_allocated_gib": gpu_mem_gib(device), "phases_s": phase_seconds(before)}

    rec.measure("ours", name, start)
    return holder.get("engine")


def phase_seconds(before: dict[str, float]) -> dict[str, float]:
    """Seconds each loading phase (loader.load_phase: the NF4 kernels' build, their tuning, the sampler's kernels...)
    took since `before` (a copy of LOAD_PROGRESS.finished)."""
    return {name: round(spent, 2) for name, total in LOAD_PROGRESS.finished.items()
            if (spent := total - before.get(name, 0.0)) > 0}


def _stop_engine(rec: Recorder, engine, device) -> None:
    try:
        release_engine(engine, device)
    except Exception as err:  # the next engine may then lack memory; its own error will say so
        rec.log(f"releasing the engine failed: {type(err).__name__}: {err}")
