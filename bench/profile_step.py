"""Where the GPU time of one decode step goes: kernels of CUDA-graph replays grouped by kind.

    python -m bench.profile_step [--model 1b] [--batch 32] [--mode merged] [--prefill] [--out bench/results]

Builds the random-weight NF4 model (as `python -m bench`), runs a batch of greedy requests until every
row decodes, then profiles 5 decode steps with torch.profiler (CUPTI reports the kernels a graph replay
launches) and groups device time by kernel kind: NF4 matmul, 16-bit matmul (LM head), attention,
LoRA, fused glue, other glue (every other small kernel: casts, copies, index ops), sampling. Writes
``<date>-<device>-<model>-b<batch>-<mode>-profile.json`` with the per-kind totals per step, the top
kernels, and ``ratios``: decode_step_ms_b<batch>_<model> (GPU time per step) and
glue_fraction_b<batch>_<model> (non-matmul, non-attention share; issue 13 wants <= 0.10).

With --prefill it profiles instead the step that prefills the whole batch (128-token prompts): after one
round run to completion (kernels compiled, adapter slots loaded), the first steps of three more rounds are
timed on the host, a fifth round's first step is profiled on the device and a sixth's under cProfile. Writes
``...-prefill-profile.json`` (no ratios): per-kind GPU ms of that step beside its host wall time, which tells
a step bound by its launches from one bound by its kernels, and the host's top functions. Both modes add
``timeline`` (bench.timeline): the profiled span's idle time between kernels across streams, its longest gaps, and a
``window`` of 60 kernels from a mid-step layer on (start, duration, stream: what each waits on).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.build import device_name, sync
from bench.results import write_named_result

KINDS = (  # first match wins; lower-case substrings of kernel names
    ("nf4_matmul", ("nf4_mma", "nf4_tile", "nf4_wide", "nf4_wgmma", "nf4_gemm", "split_k_sum", "nf4_matmul",
                    "nf4_gemv", "nf4_dequant", "kgemm_4bit", "dequantize")),
    ("attention", ("_decode_kernel", "_merge_kernel", "_merge_splits", "_prefill_kernel", "flash", "attention")),
    ("lora", ("lora", "sgmv", "bgmv", "shrink", "expand")),
    ("fused_glue", ("_add_rmsnorm", "_silu_mul", "_rotary_write_kv")),
    ("sampling", ("sort", "topk", "softmax", "argmax", "cumsum", "multinomial", "exponential")),
    ("matmul_16bit", ("gemm", "gemv", "cutlass", "cublas", "sm90_xmma", "nvjet")),
)


LAYER_ANCHOR = "_add_rmsnorm"  # the first kernel of each layer's block (bench.timeline.window)


def kind_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((kind for kind, needles in KINDS if any(n in name for n in needles)), "other_glue")


def summarize(events: list[tuple[str, float]], steps: int) -> dict:
    """(kernel name, device µs) events -> per-kind ms per step, glue fraction, top kernels, and launches per step
    (by kind and for the top kernels: at a few us a kernel, their count is the glue's lever)."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    count_kind: dict[str, int] = {}
    count_name: dict[str, int] = {}
    for name, us in events:
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
        by_name[name] = by_name.get(name, 0.0) + us
        count_kind[kind] = count_kind.get(kind, 0) + 1
        count_name[name] = count_name.get(name, 0) + 1
    total = sum(by_kind.values())
    glue = by_kind.get("fused_glue", 0.0) + by_kind.get("other_glue", 0.0)
    top = [n for n, _ in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]]
    return {
        "ms_per_step": {k: v / steps / 1000 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "total_ms_per_step": total / steps / 1000,
        "glue_fraction": glue / total if total else None,
        "top_kernels_ms_per_step": {n: by_name[n] / steps / 1000 for n in top},
        "launches_per_step": {k: count_kind[k] / steps for k in sorted(count_kind, key=lambda k: -count_kind[k])},
        "top_kernels_launches_per_step": {n: count_name[n] / steps for n in top},
    }


def device_events(run, device: torch.device, timeline: dict | None = None) -> list[tuple[str, float]]:
    """(kernel name, device µs) of every CUDA kernel that `run()` launches, synchronized at the end; with `timeline`,
    that dict gets bench.timeline's idle summary of the same run (span, busy, overlapped and idle ms, longest gaps)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.timeline import idle_summary, kernel_intervals, window

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        sync(device)
    if timeline is not None:
        intervals = kernel_intervals(prof)
        timeline.update(idle_summary(intervals))
        timeline["window"] = window(intervals, LAYER_ANCHOR)
    return [(e.name, e.device_time) for e in prof.events()
            if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
            and e.device_time > 0]


def host_profile(run, device: torch.device, lines: int = 45) -> dict[str, list[str]]:
    """cProfile of `run()` (synchronized at the end): the top functions by own time and by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run()
    sync(device)
    profiler.disable()
    found = {}
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(lines)
        found[order] = [line for line in text.getvalue().splitlines() if line.strip()]
    return found


def first_step(engine, requests, run_step, device: torch.device) -> float:
    """Add `requests`, run the first step through `run_step` (host wall ms, synchronized), then run them to
    completion."""
    for request in requests:
        engine.add_request(request)
    sync(device)
    start = time.perf_counter()
    run_step()
    sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    while engine.has_unfinished():
        engine.step()
    return wall_ms


def profile_prefill(engine, make, args, device: torch.device) -> None:
    """GPU time by kind of the step that prefills a whole batch, beside that step's host wall time."""
    warm_ms = first_step(engine, make(), engine.step, device)  # compiles, loads adapter slots
    wall_ms = [first_step(engine, make(), engine.step, device) for _ in range(3)]
    events: list[tuple[str, float]] = []
    timeline: dict = {}
    first_step(engine, make(), lambda: events.extend(device_events(engine.step, device, timeline)), device)
    summary = summarize(events, 1)
    host: dict[str, list[str]] = {}
    first_step(engine, make(), lambda: host.update(host_profile(engine.step, device)), device)
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name(device), "model": args.model,
              "batch": args.batch, "mode": args.mode, "torch": torch.__version__, "step": "prefill",
              "command": f"python -m bench.profile_step --model {args.model} --batch {args.batch} "
                         f"--mode {args.mode} --prefill",
              "first_round_step_ms": warm_ms, "prefill_step_wall_ms": wall_ms, **summary, "timeline": timeline,
              "host_profile": host}
    print(json.dumps({k: result[k] for k in ("prefill_step_wall_ms", "total_ms_per_step", "ms_per_step", "timeline")},
                     indent=1))
    write_named_result(args.out, result, f"{args.model}-b{args.batch}-{args.mode}-prefill-profile")


def main() -> None:
    from bench.build import build_engine, kv_blocks_for, loaded_model, our_model, random_adapters, random_hf_model
    from bench.ours import make_requests
    from bench.shapes import llama_config, shape_facts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", default="merged", choices=["merged", "unmerged", "mixed32"])
    parser.add_argument("--prefill", action="store_true", help="profile the batch's prefill step instead")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script, no kernel times")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    config = llama_config(args.model)
    hf = random_hf_model(config, device, dtype)
    ours = our_model(hf, device, dtype)
    del hf
    torch.cuda.empty_cache()
    engine_mode = "merged" if args.mode == "merged" else "unmerged"
    engine = build_engine(loaded_model(ours, config), engine_mode, device, kv_blocks_for(args.batch, 512))
    refs = random_adapters(shape_facts(config), 32 if args.mode == "mixed32" else 1, device)
    if args.prefill:
        profile_prefill(engine, lambda: make_requests(config.vocab_size, args.batch, 128, 8, refs), args, device)
        return
    requests = make_requests(config.vocab_size, args.batch, 128, 64, refs)  # 64 tokens: the 28 steps below fit
    for request in requests:
        engine.add_request(request)
    while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):  # graphs captured, kernels compiled
        engine.step()
    sync(device)
    # The step's wall time, unprofiled: with the LoRA side stream the kernels' sum exceeds it, and it is what an A/B of
    # a launch change (LORAPLEX_LORA_SIDE_EXPAND) reads. Async scheduling keeps the GPU fed from step to step here.
    timed = 20
    start = time.perf_counter()
    for _ in range(timed):
        engine.step()
    sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / timed
    steps = 5
    timeline: dict = {}
    events = device_events(lambda: [engine.step() for _ in range(steps)], device, timeline)
    summary = summarize(events, steps)
    tag = f"b{args.batch}_{args.model}"
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name(device), "model": args.model,
              "batch": args.batch, "mode": args.mode, "torch": torch.__version__,
              "command": f"python -m bench.profile_step --model {args.model} --batch {args.batch} --mode {args.mode}",
              "wall_ms_per_step": wall_ms, **summary, "timeline": timeline,
              "ratios": {f"decode_step_ms_{tag}": summary["total_ms_per_step"],
                         f"glue_fraction_{tag}": summary["glue_fraction"]}}
    shown = ("wall_ms_per_step", "ms_per_step", "total_ms_per_step", "glue_fraction", "launches_per_step")
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    write_named_result(args.out, result, f"{args.model}-b{args.batch}-{args.mode}-profile")


if __name__ == "__main__":
    main()
