"""Run the CUDA NF4 kernel on one 8B layer shape a few times, for `ncu` to profile (GPU machine).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
        -k regex:nf4_ python -m bench.nf4_profile --rows 1 [--kernel tile|mma]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=28672)
    parser.add_argument("--warps", type=int, default=2)
    parser.add_argument("--kernel", default="tile", choices=("tile", "mma"))
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    from server.kernels.nf4 import cuda_nf4
    from server.kernels.nf4.nf4_layout import tile_pack
    from server.kernels.nf4.nf4_ops import nf4_absmax_float

    w = torch.randn(args.out_features, args.in_features, device="cuda").to(torch.bfloat16)
    codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = nf4_absmax_float(state).contiguous()
    x = torch.randn(args.rows, args.in_features, device="cuda").to(torch.bfloat16)
    shape = tuple(state.shape)
    tiled = tile_pack(codes, absmax, shape)
    for _ in range(3):
        if args.kernel == "tile":
            cuda_nf4.nf4_tile(x, tiled, shape, state.code)
        else:
            cuda_nf4.nf4_mma(x, codes, absmax, shape, state.code, warps=args.warps)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
