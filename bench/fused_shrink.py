"""The LoRA shrink inside the x-resident NF4 kernel (server/model/cuda_nf4_lora.py) against the base kernel alone and
the Triton shrink, on the 8B linear shapes at 32 tokens with 32 rank-16 adapters (the mixed-adapter decode step).

    python -m bench.fused_shrink [--rows 32] [--out bench/results]

µs per call by CUDA-graph replay (bench.kernels.time_calls) over weight and pool copies that defeat the L2: `base`
the resident kernel as the engine runs it, `fused` with the LoRA units, `shrink` the Triton shrink alone, `serial` the
base then the shrink. In a step the shrink runs beside the base on a side stream but gets SMs only as the base's blocks
retire, so `serial` is about what the engine pays today; `fused` below it is the gain. `fused_over_serial` in ratios.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.kernels import L2_DEFEAT_BYTES, time_calls, timing_layer
from bench.results import write_named_result

RANK, ADAPTERS = 16, 32
# 8B: (in, out, LoRA slices, the resident kernel's warpgroups as the engine's tuning picked them on the H200)
LINEARS = {"qkv": (4096, 6144, 3, 6), "o": (4096, 4096, 1, 4), "gate_up": (4096, 28672, 2, 7),
           "down": (14336, 4096, 1, 6)}


def run_linear(name: str, rows: int) -> dict:
    from server.model import cuda_nf4_lora, cuda_nf4_wgmma, triton_lora
    from server.model.lora_meta import SlotLayout, decode_lora_meta

    in_features, out_features, slices, warpgroups = LINEARS[name]
    layer = timing_layer(in_features, out_features)
    copies = len(layer.nf4)
    shape = (out_features, in_features)
    gen = torch.Generator(device="cuda").manual_seed(7)
    pool_rows = slices * RANK * ADAPTERS
    pool_copies = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / (pool_rows * in_features * 2))))  # the pools' own
    pools = [(torch.randn(pool_rows, in_features, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
             for _ in range(pool_copies)]
    calls = max(copies, pool_copies)
    layout = SlotLayout.from_lists([RANK * s for s in range(ADAPTERS)], [RANK] * ADAPTERS, RANK, "cuda")
    meta = decode_lora_meta(torch.tensor([t % ADAPTERS for t in range(rows)], dtype=torch.int32, device="cuda"))
    x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
    tiled = [nf4[3] for nf4 in layer.nf4]

    def base(i):
        return cuda_nf4_wgmma.nf4_wgmma(x, tiled[i % copies], shape, layer.table, resident_warpgroups=warpgroups,
                                        pairs=True, defer_sum=True)

    def fused(i):
        return cuda_nf4_lora.nf4_wgmma_lora(x, tiled[i % copies], shape, layer.table, pools[i % pool_copies], layout,
                                            meta, slices, warpgroups=min(warpgroups, cuda_nf4_lora.MAX_WARPGROUPS_32),
                                            defer_sum=True)

    def shrink(i):
        return triton_lora.lora_shrink(x, pools[i % pool_copies], layout, meta, slices)

    # the fused h against the Triton shrink's (the same layout: each token's own slot's columns)
    worst = (fused(0)[1] - shrink(0)).abs().max().item()
    fns = {"base": base, "fused": fused, "shrink": shrink, "serial": lambda i: (base(i), shrink(i))}
    times = {key: round(time_calls([lambda i=i, f=f: f(i) for i in range(calls)]), 2) for key, f in fns.items()}
    return {"linear": name, "rows": rows, "warpgroups": warpgroups, "lora_rows": pool_rows,
            "h_max_abs_diff": worst, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--linears", default=",".join(LINEARS))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    results = []
    for name in args.linears.split(","):
        row = run_linear(name, args.rows)
        print(row, flush=True)
        results.append(row)
    ratios = {f"fused_over_serial_{r['linear']}": round(r["fused"] / r["serial"], 3) for r in results}
    write_named_result(args.out, {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                  "command": f"python -m bench.fused_shrink --rows {args.rows}", "linears": results,
                                  "ratios": ratios}, "fused-shrink")


if __name__ == "__main__":
    main()
