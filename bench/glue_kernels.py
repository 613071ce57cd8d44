"""The decode step's glue kernels (silu_mul over gate_up's split-K partials, the residual add + RMSNorm) at
several launch shapes, timed as a decode graph runs them.

    python -m bench.glue_kernels [--models 1b,8b] [--rows 16,32,64] [--out bench/results]

For each model shape and row count it quantizes random gate_up and down weights, runs gate_up as the decode
step does (split-K partials handed to silu_mul when the dispatch splits K), then times with the profiler (device
time of each kernel, CUDA-graph replays of CALLS launches) silu_mul at each (elements a program, warps) of
SILU_LAUNCHES with the split count read at run time and compiled in, and add_rmsnorm at each of NORM_WARPS.
Every variant's output is checked against the default launch's: silu_mul bit for bit (the same operations per
element), the norm within one bf16 rounding (its row sum's order depends on the warps). The profile step's
glue_fraction (bench.profile_step) counts these kernels' device time, so the device time is what is reported.
Writes ``<out>/<date>-<device>-glue-kernels.json``: us a launch per variant, model and row count.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from bench.build import device_name
from bench.results import write_named_result
from bench.shapes import SHAPES

CALLS = 32
SILU_LAUNCHES = ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8))
NORM_WARPS = (4, 8, 16)


def kernel_us(fn, name: str) -> float:
    """Mean device us of the kernels named `name` that CALLS launches of `fn` run, replayed as one CUDA graph."""
    from bench.kernels import capture_calls
    from bench.profile_step import device_events

    graph = capture_calls([fn], [fn] * CALLS)
    graph.replay()  # warm
    times = [us for kernel, us in device_events(lambda: [graph.replay() for _ in range(4)], torch.device("cuda"))
             if name in kernel]
    return sum(times) / len(times)


def shape_rows(model: str, rows: int) -> dict:
    from server.kernels.glue import triton_glue
    from server.kernels.split_sums import SplitSums
    from server.model.quant import NF4Linear

    cfg = SHAPES[model]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    gate_up = NF4Linear(torch.randn(2 * inter, hidden, device="cuda", generator=gen) * 0.02, None, torch.bfloat16)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    gu = gate_up(x, defer_sum=True)
    splits = gu.partials.shape[0] if isinstance(gu, SplitSums) else 1
    reference = triton_glue.silu_mul(gu)
    silu = {}
    for compiled in (False, True):
        for launch in SILU_LAUNCHES:
            key = f"{launch[0]}x{launch[1]}{'_compiled' if compiled else ''}"
            got = triton_glue.silu_mul(gu, launch=launch, compiled_splits=compiled)
            if not torch.equal(got, reference):
                raise AssertionError(f"silu_mul {key} differs from the default launch ({model}, {rows} rows)")
            silu[key] = round(kernel_us(functools.partial(triton_glue.silu_mul, gu, launch, compiled),
                                        "_silu_mul"), 3)
    h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    delta = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref_h, ref_y = triton_glue.add_rmsnorm(h, delta, weight, 1e-5)
    norm = {}
    for warps in NORM_WARPS:
        got_h, got_y = triton_glue.add_rmsnorm(h, delta, weight, 1e-5, num_warps=warps)
        if not torch.equal(got_h, ref_h) or not torch.allclose(got_y.float(), ref_y.float(), rtol=1 / 128, atol=0):
            raise AssertionError(f"add_rmsnorm with {warps} warps differs from the default ({model}, {rows} rows)")
        norm[str(warps)] = round(kernel_us(functools.partial(triton_glue.add_rmsnorm, h, delta, weight, 1e-5, warps),
                                           "_add_rmsnorm"), 3)
    return {"gate_up_splits": splits, "silu_mul_us": silu, "add_rmsnorm_us": norm,
            "silu_default": "x".join(map(str, triton_glue.silu_launch(rows, splits > 1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--rows", default="16,32,64")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    results = {}
    for model in args.models.split(","):
        for rows in map(int, args.rows.split(",")):
            results[f"{model}/{rows}"] = row = shape_rows(model, rows)
            print(model, rows, row, flush=True)
    write_named_result(args.out, {
        "benchmark": "glue_kernels", "date": time.strftime("%Y-%m-%d"), "device": device_name(torch.device("cuda")),
        "torch": torch.__version__,
        "command": f"python -m bench.glue_kernels --models {args.models} --rows {args.rows}",
        "calls_per_graph": CALLS, "results": results,
    }, "glue-kernels")


if __name__ == "__main__":
    main()
