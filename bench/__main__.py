"""`python -m bench --model 1b|8b [--quick] [--out bench/results]`: loraplex vs HF+PEFT in one run.

Order: bandwidth; build (random HF bf16 model on the GPU, our NF4 model from its state dict, the HF
model converted in place to bitsandbytes NF4, 32 random adapters); our engine (unmerged engine:
base, one adapter, 8 and 32 adapters, context 128 vs 2048; merged engine: one merged adapter, swap
time, bit-exact restore); then the baseline, slowest last. The JSON is rewritten after every
measurement, and each measurement that fails records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bench.plan import Plan, versions
from bench.results import Recorder, slug
from bench.shapes import SHAPES, llama_config, shape_facts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(SHAPES),
                        help="model shape (tiny = CPU self-test of the harness, not a benchmark)")
    parser.add_argument("--quick", action="store_true", help="few tokens and iterations: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for JSON + PNG")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no measurement past this many seconds (default 360 for 1b, 480 for 8b)")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from bench.build import device_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model != "tiny" and device.type != "cuda":
        print(f"--model {args.model} needs a CUDA GPU (use --model tiny to self-test on a CPU)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu_name = device_name(device)
    plan = Plan.make(args.model, args.quick, args.budget_s)
    config = llama_config(args.model)
    now = dt.datetime.now(dt.timezone.utc)
    data: dict[str, Any] = {
        "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"), "model": args.model,
        "device": gpu_name, "quick": args.quick, "command": "python -m bench " + " ".join(argv or sys.argv[1:]),
        "versions": versions(),
        "config": {"shape": shape_facts(config), "dtype": str(dtype), "plan": plan.as_dict(),
                   "engine": {"max_slots": 32, "max_rank": 16, "max_batch_size": 64, "max_model_len": 4096,
                              "max_num_batched_tokens": 8192, "cuda_graphs": device.type == "cuda"},
                   "adapters": {"rank": 16, "alpha": 32, "modules": "q,k,v,o,gate,up,down", "count": 32}},
    }
    suffix = "-quick" if args.quick else ""
    path = args.out / f"{data['date']}-{slug(gpu_name)}-{args.model}{suffix}.json"
    rec = Recorder(path, data, plan.budget_s)
    rec.log(f"{args.model} on {gpu_name}; writing {path}; budget {plan.budget_s:.0f} s")
    torch.set_grad_enabled(False)

    from bench.roofline import measure_bandwidth

    rec.measure(None, "bandwidth", lambda: measure_bandwidth(device, plan.bandwidth_bytes, plan.bandwidth_iters))
    state: dict[str, Any] = {}
    rec.measure("build", "models", lambda: build_models(state, config, device, dtype))
    rec.measure("build", "adapters", lambda: build_adapters(state, data["config"]["shape"], plan, device))
    if "hf" not in state or "adapters" not in state:
        rec.log("build failed; nothing more to measure")
        return 1
    if not args.skip_ours:
        from bench.run_ours import run_ours

        run_ours(rec, state, plan, config, device)
    if not args.skip_baseline:
        from bench.run_baseline import run_baseline

        run_baseline(rec, state, plan, config.vocab_size, device)
    from bench.plot import make_plot

    data["plot"] = make_plot(data, path.with_suffix(".png"))
    if device.type == "cuda":
        data["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    rec.save()
    rec.log(f"done: {path}")
    for key, value in data["ratios"].items():
        rec.log(f"  {key} = {value}")
    if data["errors"]:
        rec.log(f"{len(data['errors'])} measurement(s) failed: {', '.join(data['errors'])}")
    return 0


def build_models(state: dict, config, device, dtype) -> dict:
    from bench.build import free_memory, gpu_mem_gib, hf_to_nf4, our_model, random_hf_model, sync

    start = time.perf_counter()
    hf = random_hf_model(config, device, dtype)
    sync(device)
    t_hf = time.perf_counter()
    ours = our_model(hf, device, dtype)
    sync(device)
    t_ours = time.perf_counter()
    converted = hf_to_nf4(hf, dtype)
    free_memory(device)
    sync(device)
    t_nf4 = time.perf_counter()
    state.update(hf=hf, ours=ours)
    return {
        "hf_random_bf16_s": t_hf - start, "ours_nf4_s": t_ours - t_hf, "hf_to_nf4_s": t_nf4 - t_ours,
        "hf_nf4_linears": converted, "gpu_allocated_gib": gpu_mem_gib(device),
        "hf_nf4_method": "in memory: nn.Linear -> bnb.nn.Linear4bit(nf4, double quant), Params4bit.to(device)",
    }


def build_adapters(state: dict, shape: dict, plan: Plan, device) -> dict:
    from bench.build import random_adapters
    from bench.shapes import adapter_params

    start = time.perf_counter()
    state["adapters"] = random_adapters(shape, plan.num_adapters, device)
    return {"count": plan.num_adapters, "params_each": adapter_params(shape, 16),
            "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    sys.exit(main())
