"""Measurements of the loraplex engine: throughput, decode step time, merged swap."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from bench.build import sync
from server.engine.engine import LLMEngine
from server.engine.request import AdapterRef, FinishReason, Request, SamplingParams


def make_requests(vocab_size: int, batch: int, prompt_len: int, max_tokens: int,
                  adapters: list[AdapterRef | None], seed: int = 0) -> list[Request]:
    """`batch` greedy requests of random prompts; row i uses adapters[i % len(adapters)]."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).tolist()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [
        Request(prompt_token_ids=prompt, params=params, adapter=adapters[row % len(adapters)])
        for row, prompt in enumerate(prompts)
    ]


def _is_pure_decode(engine: LLMEngine) -> bool:
    """The next step decodes only: nothing waits, nothing is still prefilling."""
    running = engine.scheduler.running
    return bool(running) and not engine.scheduler.waiting and not any(r.is_prefilling for r in running)


def _drive(engine: LLMEngine, requests: list[Request], device: torch.device):
    """Add all requests and step until all finish. Returns (wall seconds, first step seconds, decode
    steps) where each decode-only step is (seconds, rows, mean context length)."""
    steps: list[tuple[float, int, float]] = []
    first_step_s = None
    sync(device)
    start = time.perf_counter()
    try:
        for request in requests:
            engine.add_request(request)
        while engine.has_unfinished():
            pure = _is_pure_decode(engine)
            if pure:
                running = engine.scheduler.running
                rows, context = len(running), sum(r.num_tokens for r in running) / len(running)
            step_start = time.perf_counter()
            engine.step()
            step_s = time.perf_counter() - step_start
            first_step_s = step_s if first_step_s is None else first_step_s
            if pure:
                steps.append((step_s, rows, context))
    except Exception as err:
        engine.fail_all(f"benchmark step failed: {err}")
        raise
    sync(device)
    wall = time.perf_counter() - start
    failed = [r.request_id for r in requests if r.finish_reason not in (FinishReason.LENGTH, FinishReason.STOP)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests did not finish normally (first: {failed[0]})")
    return wall, first_step_s, steps


def run_to_completion(engine: LLMEngine, requests: list[Request], device: torch.device, skip: int = 0) -> dict:
    """Tokens/s from add to last token (prefill included), plus decode-only step times."""
    wall, first_step_s, steps = _drive(engine, requests, device)
    tokens = sum(len(r.output_token_ids) for r in requests)
    return {
        "batch": len(requests), "prompt_len": len(requests[0].prompt_token_ids),
        "max_tokens": requests[0].params.max_tokens, "generated_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall, "first_step_ms": None if first_step_s is None else first_step_s * 1e3,
        **decode_summary(steps, full_batch=len(requests), skip=skip),
    }


def decode_summary(steps: list[tuple[float, int, float]], full_batch: int, skip: int) -> dict:
    """Stats over decode-only steps that ran the full batch, after skipping the first `skip`."""
    full = [(s, c) for s, rows, c in steps if rows == full_batch][skip:]
    if not full:
        return {"decode_steps": 0, "decode_step_ms_median": None}
    times = sorted(s * 1e3 for s, _ in full)
    median = statistics.median(times)
    return {
        "decode_steps": len(full),
        "decode_step_ms_median": median,
        "decode_step_ms_mean": statistics.fmean(times),
        "decode_step_ms_min": times[0],
        "decode_step_ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "decode_tokens_per_s": full_batch / (median / 1e3),
        "mean_context": statistics.fmean(c for _, c in full),
    }


def measure_generation(engine: LLMEngine, make: Callable[[], list[Request]], device: torch.device,
                       repeats: int = 1) -> dict:
    """One warm-up run of the same shape (captures CUDA graphs, loads adapter slots), then `repeats` timed
    runs: the result is the run of median tokens/s, with every run's tokens/s beside it."""
    warmup = run_to_completion(engine, make(), device)
    runs = [run_to_completion(engine, make(), device) for _ in range(repeats)]
    result = sorted(runs, key=lambda run: run["tokens_per_s"])[len(runs) // 2]
    result["warmup_wall_s"] = warmup["wall_s"]
    if repeats > 1:
        result["tokens_per_s_runs"] = [run["tokens_per_s"] for run in runs]
    return result


def measure_context(engine: LLMEngine, make: Callable[[], list[Request]], device: torch.device,
                    warmup: Callable[[], list[Request]]) -> dict:
    """Decode step time at a given prompt length: decode-only steps with the whole batch running
    (requests prefill in chunks, so early ones decode while later ones still prefill; those steps
    and the first full one are left out)."""
    run_to_completion(engine, warmup(), device)
    return run_to_completion(engine, make(), device, skip=1)


def measure_swap(engine: LLMEngine, adapters: list[AdapterRef], num_swaps: int, device: torch.device) -> dict:
    """MergedSwapper.swap between two adapters (median of `num_swaps`), then back to the base and a
    bit-for-bit check of every NF4 code and absmax against the pristine copy."""
    swapper = engine.swapper
    if swapper is None:
        raise RuntimeError("engine has no MergedSwapper (needs lora_mode merged or auto)")
    first, second = adapters[0], adapters[1]
    sync(device)
    swapper.swap(None)
    to_first = swapper.swap((first.name, first.version), first.weights)
    seconds, outside = [], []
    for index in range(num_swaps):
        ref = second if index % 2 == 0 else first
        sync(device)
        start = time.perf_counter()
        seconds.append(swapper.swap((ref.name, ref.version), ref.weights))
        sync(device)
        outside.append(time.perf_counter() - start)
    to_base = swapper.swap(None)
    return {
        "num_swaps": num_swaps,
        "swap_ms_median": statistics.median(seconds) * 1e3,
        "swap_ms_min": min(seconds) * 1e3,
        "swap_ms_max": max(seconds) * 1e3,
        "swap_ms_all": [s * 1e3 for s in seconds],
        "swap_ms_median_outside": statistics.median(outside) * 1e3,
        "base_to_adapter_ms": to_first * 1e3,
        "adapter_to_base_ms": to_base * 1e3,
        "bit_exact": bool(swapper.is_pristine()),
        "pristine_gib": swapper.pristine_nbytes / 2**30,
    }
