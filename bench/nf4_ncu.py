"""Launch the CUDA NF4 kernels on one 8B layer for Nsight Compute (run under ``ncu``; times nothing itself).

    ncu --clock-control none --kernel-name regex:"nf4_(tile|gemv|gemv_pairs|sol|wide|wgmma)_kernel" \
        python -m bench.nf4_ncu --rows 1,32 --probes stream,dequant,x --wgmma-probes loads,kernel

Per row count it launches the kernel the dispatch runs at that count (`tile`, `gemv`, `wide`, `wgmma`), and with
--pairs the byte-pair table's kernel too (`gemv_pairs`, at 1-8 rows); with
--probes, once per layer the speed-of-light probes of bench.nf4_sol (one row, --probe-config warps,splits); with
--wgmma-probes, those of bench.wgmma_sol (32 rows, the server's split of K). Each launch runs twice (a warm-up, then
the profiled one: pass --launch-skip to ncu or read the second of each pair); with --resident 4,7p the x-resident
wgmma kernel at 32 rows with those warpgroup counts (p: the byte-pair table). --rows '' launches no dispatch kernel
(and needs no build of the CUDA extension: the probes build their own libraries)."""

from __future__ import annotations

import argparse

import torch

from bench.kernels import Layer, layer_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="8b")
    parser.add_argument("--layer", default="gate_up")
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--probes", default="", help="bench.nf4_sol probes: stream,dequant,mma,x")
    parser.add_argument("--probe-config", default="2,8", help="warps a block, splits of K")
    parser.add_argument("--pairs", action="store_true", help="also the byte-pair table's kernel at 1-8 rows")
    parser.add_argument("--wgmma-probes", default="", help="bench.wgmma_sol probes at 32 rows: loads,kernel,...")
    parser.add_argument("--resident", default="", help="x-resident wgmma kernels at 32 rows: 7 or 7p (pair table)")
    args = parser.parse_args()
    from bench.nf4_sol import PROBES, probe_calls
    from server.kernels.nf4.triton_nf4 import device_num_sms

    in_features, out_features = layer_shapes(args.model)[args.layer]
    layer = Layer(in_features, out_features, copies=1, seed=1)
    codes, absmax, state, tiled = layer.nf4[0]
    for rows in (int(r) for r in filter(None, args.rows.split(","))):
        from server.kernels.nf4 import cuda_nf4_gemv, nf4_dispatch

        x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
        kernel = nf4_dispatch.kernel_for(rows, layer.shape, num_sms=device_num_sms(0))
        for _ in range(2):
            nf4_dispatch.nf4_linear_cuda(x, codes, absmax, layer.shape, layer.table, None, state, tiled=tiled)
        torch.cuda.synchronize()
        print(f"rows {rows}: launched {kernel} twice", flush=True)
        if args.pairs and rows <= 8:
            for _ in range(2):
                cuda_nf4_gemv.nf4_gemv_pairs(x, tiled, layer.shape, layer.table, num_sms=device_num_sms(0))
            torch.cuda.synchronize()
            print(f"rows {rows}: launched the pairs kernel twice", flush=True)
    warps, splits = (int(v) for v in args.probe_config.split(","))
    x = torch.randn(1, in_features, device="cuda").to(torch.bfloat16)
    for probe in filter(None, args.probes.split(",")):
        call = probe_calls(layer, x, PROBES[probe], warps, splits)[0]
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        print(f"probe {probe} ({warps} warps, {splits} splits): launched twice", flush=True)
    if args.wgmma_probes:
        launch_wgmma_probes(layer, args.wgmma_probes.split(","), device_num_sms(0))
    for spec in filter(None, args.resident.split(",")):  # "7": 7 warpgroups, the 16-entry table; "7p": the pair table
        from server.kernels.nf4 import cuda_nf4_wgmma

        x = torch.randn(32, in_features, device="cuda").to(torch.bfloat16)
        warpgroups, pairs = int(spec.rstrip("p")), spec.endswith("p")
        for _ in range(2):
            cuda_nf4_wgmma.nf4_wgmma(x, tiled, layer.shape, layer.table, num_sms=device_num_sms(0),
                                     resident_warpgroups=warpgroups, pairs=pairs)
        torch.cuda.synchronize()
        print(f"x-resident kernel, {spec} (32 rows): launched twice", flush=True)


def launch_wgmma_probes(layer: Layer, probes: list[str], num_sms: int) -> None:
    """bench.wgmma_sol's probes at 32 rows on the server's split of K, each launched twice."""
    from bench import wgmma_sol
    from server.kernels.nf4.cuda_nf4_wgmma import wgmma_split_k

    x = torch.randn(32, layer.shape[1], device="cuda").to(torch.bfloat16)
    splits = wgmma_split_k(32, layer.shape, num_sms, 32, wgmma_sol.INSTANCES[32])
    tiled = layer.nf4[0][3]
    for probe in probes:
        call, _ = wgmma_sol.probe_call(layer, x, probe, splits)
        for _ in range(2):
            call(tiled)
        torch.cuda.synchronize()
        print(f"wgmma probe {probe} (32 rows, {splits} splits): launched twice", flush=True)


if __name__ == "__main__":
    main()
