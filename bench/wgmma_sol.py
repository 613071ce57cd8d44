"""Where the NF4 wgmma kernel's time goes at 17-32 and 65-128 rows: its stage loop with parts left out, in one run.

    python -m bench.wgmma_sol [--models 8b,1b] [--rows 32] [--shapes NAME:IN:OUT,...] [--out bench/results]

Times by CUDA-graph replay over weight copies (bench.kernels.time_calls), per layer shape, the probes of
bench/csrc/wgmma_sol.cu: at up to 32 rows the 32-token instance (three blocks an SM, one quant block a stage), at
33-128 rows the 128-token one the dispatch runs at 128 rows (one block an SM), on the server's grid and split of K,
compiled again with parts of its stage loop left out
(server/kernels/nf4/csrc/nf4_wgmma.cuh, kWgmmaProbe*; NOT the semantics, only the times mean anything): ``kernel``
(nothing left out: the server's kernel less its split-K sum, checked bit for bit against the server's output,
``exact``), ``no_x`` (x stored once: no x loads, stores or fences in the loop), ``no_barrier``, ``no_x_barrier``,
``no_dequant`` (the raw code words as the wgmma's A), ``no_mma``, ``dequant_loads`` (the code loads and the exact
dequantization alone), ``mma_loads`` (the code loads and the wgmmas alone) and ``loads``; beside them ``bf16``
(cuBLAS) and ``server`` (cuda_nf4_wgmma.nf4_wgmma with the same block and split, its sum included). A probe's time
against ``kernel`` is what the part left out costs while the rest stays. Writes ``<out>/<date>-<device>-wgmma-sol.json``
with ``ratios``: each probe's geometric mean over the 8B shapes at 32 (128) rows over ``kernel``
(``wsol_<probe>_over_kernel_m32``, ``_m128``) and over ``bf16`` (``wsol_<probe>_over_bf16_m32``, ``_m128``). Why the
128-token probes: at 128 rows that instance is 1.6 of bf16 on the H200 (issue 14's target 1.0), and x's staging
(16-byte loads, permuted 4-byte stores, a fence and a barrier a quant block, by every thread) is there 16 KB a
block and quant block against 4 KB of codes; ``no_x`` bounds what x brought by the TMA unit instead would save.

H100, 2026-12-06 (bench/results/2026-12-06-nvidia-h100-80gb-hbm3-wgmma-sol-s38-async.json, µs, 8B gate_up at 32
rows): kernel 48.1, dequant_loads 35.2, mma_loads 36.4, no_dequant 42.1, no_mma 44.8, no_x 43.7, no_barrier 46.7.
The exact dequantization (the 16-entry table, 8 instructions a weight pair) with the code loads alone takes three
quarters of the kernel: issue-bound on the SMs that hold two of gate_up's 224 blocks (132 SMs: 92 hold two, 40
one). Codes brought by cp.async into a shared-memory ring of 4 or 8 slots instead of the register ring (design in
674a251) sped the MMAs and loads alone (28.6 against 36.4 at 8 slots) but slowed the whole kernel (58.0 and 59.4):
more shared-memory traffic beside the table loads. Bulk copies (the TMA unit: lane 0 of a warp issued a block's 576
bytes on the slot's mbarrier, the lanes waited on its phase and read the slot back; design in 3d4c4a2, read one block
ahead in ccdd2ff) did the same: the loads alone 27.4-28.0 against 33.6, the MMAs and loads 32.2 (34.5 read ahead),
but the dequantization with them 44.7 (49.4) against 35.5 and the whole kernel 62-69 against 48
(-wgmma-sol-s39-bulk.json, -s39-bulk-ahead.json). So any ring through shared memory, however it is filled, slows the
exact dequantization beside it. Nor does DRAM latency hold the loads: with the codes and scales asked of the L2
eight quant blocks ahead by the TMA unit's bulk prefetch (design in d9ec549), the loads alone took 34.3 against
33.6 us and the whole kernel 57.0 against 48.8 (-wgmma-sol-s40-l2.json); nor DRAM pages or channels shared by
warps reading the same offset of their tiles at once: with each row group's walk rotated (design in 4e564b2) the
loads alone took 34.2 against 33.6 (-wgmma-sol-s40-rot.json).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import itertools
import time
from pathlib import Path

import torch

from bench.kernels import geomean, layer_shapes, time_calls, timing_layer
from bench.results import write_named_result

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "csrc" / "wgmma_sol.cu"
NO_X, NO_BARRIER, NO_DEQUANT, NO_MMA = 1, 2, 4, 8  # csrc/nf4_wgmma.cuh's kWgmmaProbe* flags
PROBES = {"kernel": 0, "no_x": NO_X, "no_barrier": NO_BARRIER, "no_x_barrier": NO_X | NO_BARRIER,
          "no_dequant": NO_DEQUANT, "no_mma": NO_MMA, "dequant_loads": NO_X | NO_BARRIER | NO_MMA,
          "mma_loads": NO_X | NO_BARRIER | NO_DEQUANT, "loads": NO_X | NO_BARRIER | NO_DEQUANT | NO_MMA}
INSTANCES = {32: 3, 128: 2}  # block tokens: the occupancy the server splits K for (wgmma_sol.cu builds both)


@functools.cache
def _library() -> ctypes.PyDLL:
    from server import nvcc_library

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        raise RuntimeError("the wgmma probes need Hopper (sm_90a)")
    path = nvcc_library.build(SOURCE, "loraplex_wgmma_sol", major, minor, feature="a", flags=("--use_fast_math",),
                              include_dirs=(ROOT / "server" / "kernels" / "nf4" / "csrc",))
    lib = ctypes.PyDLL(str(path))
    lib.loraplex_wgmma_sol.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4
    return lib


def block_tokens_for(rows: int) -> int:
    return 32 if rows <= 32 else 128


def probe_call(layer, x: torch.Tensor, probe: str, splits: int):
    """call(tiled): one launch of `probe` (the instance of block_tokens_for(rows)) at `splits` splits of K; and the
    output it leaves: out [M, N], or the partials [splits, M, N] summed in split order as split_k_sum_kernel does."""
    lib = _library()
    flags = PROBES[probe]
    (out_features, in_features), rows = layer.shape, x.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device="cuda")
    partial = torch.empty(splits, rows, out_features, dtype=torch.float32, device="cuda")

    def call(tiled):
        err = lib.loraplex_wgmma_sol(flags, block_tokens_for(rows), torch.cuda.current_stream().cuda_stream,
                                     x.data_ptr(), tiled[0].data_ptr(), tiled[1].data_ptr(), layer.table.data_ptr(),
                                     out.data_ptr(), partial.data_ptr(), rows, out_features, in_features, splits)
        if err:
            raise RuntimeError(f"wgmma_sol launch failed: cudaError {err}")

    def result() -> torch.Tensor:
        if splits == 1:
            return out.clone()
        total = partial[0].clone()
        for s in range(1, splits):
            total += partial[s]
        return total.to(x.dtype)

    return call, result


def run_shape(model: str, name: str, in_features: int, out_features: int, rows: int) -> dict:
    from server.kernels.nf4 import cuda_nf4_wgmma
    from server.kernels.nf4.triton_nf4 import device_num_sms

    layer = timing_layer(in_features, out_features)
    x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
    num_sms = device_num_sms(0)
    block_tokens = block_tokens_for(rows)
    occupancy = INSTANCES[block_tokens]
    splits = cuda_nf4_wgmma.wgmma_split_k(rows, layer.shape, num_sms, block_tokens, occupancy)
    entry = {"model": model, "layer": name, "in": in_features, "out": out_features, "rows": rows, "splits": splits,
             "us": {}}
    entry["us"]["bf16"] = round(time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in layer.bf16]), 2)
    shape, table = layer.shape, layer.table
    entry["us"]["server"] = round(time_calls([
        lambda c=c: cuda_nf4_wgmma.nf4_wgmma(x, c[3], shape, table, split_k=splits, block_tokens=block_tokens,
                                             num_sms=num_sms, occupancy=occupancy, one_wait=False)
        for c in layer.nf4]), 2)
    want = cuda_nf4_wgmma.nf4_wgmma(x, layer.nf4[0][3], shape, table, split_k=splits, block_tokens=block_tokens,
                                    num_sms=num_sms, occupancy=occupancy, one_wait=False)
    for probe in PROBES:
        call, result = probe_call(layer, x, probe, splits)
        if probe == "kernel":
            call(layer.nf4[0][3])
            entry["exact"] = bool(torch.equal(result(), want))
        entry["us"][probe] = round(time_calls([lambda c=c, call=call: call(c[3]) for c in layer.nf4]), 2)
    del layer
    torch.cuda.empty_cache()
    print(model, name, rows, splits, entry["us"], entry["exact"], flush=True)
    return entry


def ratios(layers: list[dict]) -> dict[str, float | None]:
    out = {}
    for rows in (32, 128):
        rows8b = [entry for entry in layers if entry["model"] == "8b" and entry["rows"] == rows]
        for probe in PROBES:
            for base in ("kernel", "bf16"):
                vals = [entry["us"][probe] / entry["us"][base] for entry in rows8b]
                out[f"wsol_{probe}_over_{base}_m{rows}"] = round(geomean(vals), 3) if len(vals) == 4 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="8b,1b", help="model shapes; '' for none (with --shapes)")
    parser.add_argument("--shapes", default="", help="more weights, as NAME:IN:OUT (model 'custom'): e.g. "
                        "gate_up264:4096:33792, 264 row groups of 128 where 8B gate_up has 224 over 132 SMs")
    parser.add_argument("--rows", default="32", help="rows to time, each 1-128 (17-32: the 32-token instance's "
                        "rows in the dispatch of old; 65-128: the 128-token one's)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if bad := [r for r in rows_list if not 0 < r <= 128]:
        parser.error(f"rows must be 1-128: {bad}")
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "command": f"python -m bench.wgmma_sol --models '{args.models}' --rows {args.rows} --shapes "
                          f"'{args.shapes}'", "layers": []}
    shapes = [(model, name, dims) for model in filter(None, args.models.split(","))
              for name, dims in layer_shapes(model).items()]
    for spec in filter(None, args.shapes.split(",")):
        name, in_features, out_features = spec.split(":")
        shapes.append(("custom", name, (int(in_features), int(out_features))))
    for (model, name, (in_features, out_features)), rows in itertools.product(shapes, rows_list):
        results["layers"].append(run_shape(model, name, in_features, out_features, rows))
    results["ratios"] = ratios(results["layers"])
    print(results["ratios"], flush=True)
    write_named_result(args.out, results, "wgmma-sol")


if __name__ == "__main__":
    main()
