"""Launch the CUDA NF4 tile kernel on one 8B layer for Nsight Compute (run under ``ncu``; times nothing itself).

    ncu --clock-control none --kernel-name regex:"nf4_tile_kernel" python -m bench.nf4_ncu --rows 1,32

It runs twice per row count (a warm-up launch, then the profiled one: pass --launch-skip to ncu
or read the second of each pair)."""

from __future__ import annotations

import argparse

import torch

from bench.kernels import Layer, layer_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="8b")
    parser.add_argument("--layer", default="gate_up")
    parser.add_argument("--rows", default="1,32")
    args = parser.parse_args()
    from server.model import cuda_nf4
    from server.model.triton_nf4 import device_num_sms

    in_features, out_features = layer_shapes(args.model)[args.layer]
    layer = Layer(in_features, out_features, copies=1, seed=1)
    tiled = layer.nf4[0][3]
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
        for _ in range(2):
            cuda_nf4.nf4_tile(x, tiled, layer.shape, layer.table, num_sms=device_num_sms(0))
        torch.cuda.synchronize()
        print(f"rows {rows}: launched the tile kernel twice", flush=True)


if __name__ == "__main__":
    main()
