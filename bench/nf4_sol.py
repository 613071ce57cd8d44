"""Speed of light of the NF4 one-row kernel, step by step, against bf16 cuBLAS and the tile kernel, in one run.

    python -m bench.nf4_sol [--models 8b] [--out bench/results]

Times by CUDA-graph replay over weight copies (bench.kernels.time_calls), per 8B layer shape at one row, the probes
of bench/csrc/nf4_sol.cu over the tile layout, each at its best split of K (1-16) and block of 2 or 4 warps:
``stream`` (code and scale loads alone), ``dequant_regs`` (the exact dequantization of every weight with no loads
in its loop: its own rate), ``dequant`` (loads + the dequantization), ``mma`` (+ the MMAs against a constant x),
``x`` (+ x loaded from global memory: the tile kernel less its split-K sum); ``pair`` and ``pair_regs`` (``dequant``
and ``dequant_regs`` with the byte-pair table that nf4_gemv_pairs reads: a byte's two fp32 code values by one 8-byte
load from a table of all 256 byte values, 16 copies so no load meets a bank conflict, its address one byte permute: 5
instructions a weight pair against 8, half the loads); ``bf16_floor`` (NOT the semantics: a byte's two codes as
bf16, times the scale in one bf16x2 multiply, each weight rounded twice: a floor for any table dequantization with
the loads); then
``tile`` (the kernel the dispatch runs at one row) and ``bf16``. ``pair_regs_trunc`` / ``pair_trunc`` (NOT the
semantics): ``pair_regs`` / ``pair`` with each pair packed by a byte permute of the products' upper halves instead
of the rounding conversion, to tell what the conversion (issued at a fraction of the fp32 rate on Hopper) costs.
``--probes`` times a subset, ``--warps 2,4,32`` also blocks of 32 warps (the table modes at one block an SM).
Writes ``<out>/<date>-<device>-nf4-sol.json``
with ``ratios``: each probe's geometric mean over the four shapes over bf16's (``sol_<probe>_over_bf16_m1``).
If ``dequant`` is above 0.45 of bf16, the exact semantics' dequantization (fp32 code x fp32 scale, one rounding)
cannot meet ``nf4_over_bf16_m1`` <= 0.45 with this instruction sequence, whatever the rest of the kernel; if
``dequant_regs`` is too, no better overlap of that sequence with the loads can either; ``pair`` tells whether a
shorter exact sequence moves that line, and if ``bf16_floor`` is above 0.45 too, no table dequantization over this
layout meets it, exact or not.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import math
import time
from pathlib import Path

import torch

from bench.kernels import Layer, geomean, layer_shapes, time_calls, timing_layer
from bench.results import write_named_result

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "csrc" / "nf4_sol.cu"
PROBES = {"stream": 0, "dequant_regs": 4, "dequant": 1, "mma": 2, "x": 3, "pair_regs": 6, "pair": 5, "bf16_floor": 7,
          "pair_regs_trunc": 8, "pair_trunc": 9}
WARPS = (2, 4)  # warps a block; 32 (--warps 2,4,32): one block an SM beside the 64 KB table, as nf4_gemv_pairs
SPLITS = (1, 2, 4, 8, 16)


@functools.cache
def _library() -> ctypes.PyDLL:
    from server import nvcc_library

    path = nvcc_library.build(SOURCE, "loraplex_nf4_sol", *torch.cuda.get_device_capability(),
                              include_dirs=(ROOT / "server" / "kernels" / "nf4" / "csrc",))
    lib = ctypes.PyDLL(str(path))
    lib.loraplex_nf4_sol_sink_words.argtypes = [ctypes.c_int] * 4
    lib.loraplex_nf4_sol_sink_words.restype = ctypes.c_longlong
    lib.loraplex_nf4_sol.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def probe_calls(layer: Layer, x: torch.Tensor, mode: int, warps: int, splits: int) -> list:
    """One launch a weight copy of probe `mode`."""
    lib = _library()
    out_features, in_features = layer.shape
    sink = torch.empty(lib.loraplex_nf4_sol_sink_words(warps, out_features, in_features, splits),
                       dtype=torch.int32, device="cuda")
    x_word = 0x3F803F80  # two bf16 ones

    def call(tiled):
        err = lib.loraplex_nf4_sol(mode, warps, torch.cuda.current_stream().cuda_stream, tiled[0].data_ptr(),
                                   tiled[1].data_ptr(), layer.table.data_ptr(), x.data_ptr(), x_word,
                                   sink.data_ptr(), out_features, in_features, splits)
        if err:
            raise RuntimeError(f"nf4_sol launch failed: cudaError {err}")

    return [lambda c=c: call(c[3]) for c in layer.nf4]


def run_shape(model: str, name: str, in_features: int, out_features: int, probes: tuple[str, ...] = tuple(PROBES),
              warps_list: tuple[int, ...] = WARPS) -> dict:
    from server.kernels.nf4 import cuda_nf4
    from server.kernels.nf4.triton_nf4 import device_num_sms

    layer = timing_layer(in_features, out_features)
    x = torch.randn(1, in_features, device="cuda").to(torch.bfloat16)
    entry = {"model": model, "layer": name, "in": in_features, "out": out_features, "rows": 1, "us": {},
             "config": {}, "sweep": {}}
    entry["us"]["bf16"] = round(time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in layer.bf16]), 2)
    shape, table, num_sms = layer.shape, layer.table, device_num_sms(0)
    entry["us"]["tile"] = round(time_calls([lambda c=c: cuda_nf4.nf4_tile(x, c[3], shape, table, num_sms=num_sms)
                                            for c in layer.nf4]), 2)
    for probe in probes:
        mode = PROBES[probe]
        for warps in warps_list:
            for splits in SPLITS:
                if splits > 1 and in_features // 64 // splits < 4:
                    continue
                us = round(time_calls(probe_calls(layer, x, mode, warps, splits)), 2)
                entry["sweep"][f"{probe}_w{warps}_s{splits}"] = us
                if us < entry["us"].get(probe, math.inf):
                    entry["us"][probe], entry["config"][probe] = us, {"warps": warps, "splits": splits}
    floor_us = out_features * in_features * 0.5625 / 4.2e6  # µs at 4.2 TB/s, codes + fp32 scales
    entry["floor_us_4_2tbs"] = round(floor_us, 2)
    del layer
    torch.cuda.empty_cache()
    print(model, name, entry["us"], entry["config"], flush=True)
    return entry


def ratios(layers: list[dict]) -> dict[str, float | None]:
    rows8b = [entry for entry in layers if entry["model"] == "8b"]
    out = {}
    for probe in (*PROBES, "tile"):
        vals = [entry["us"][probe] / entry["us"]["bf16"] for entry in rows8b if probe in entry["us"]]
        out[f"sol_{probe}_over_bf16_m1"] = round(geomean(vals), 3) if len(vals) == 4 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="8b")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--probes", default=",".join(PROBES), help="a subset of " + ",".join(PROBES))
    parser.add_argument("--warps", default=",".join(map(str, WARPS)), help="warps a block to sweep: 2, 4, 32")
    args = parser.parse_args()
    probes = tuple(args.probes.split(","))
    warps_list = tuple(int(w) for w in args.warps.split(","))
    if unknown := [p for p in probes if p not in PROBES] + [w for w in warps_list if w not in (2, 4, 32)]:
        parser.error(f"unknown probes or warps: {unknown}")
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "command": f"python -m bench.nf4_sol --models {args.models} --probes {args.probes} --warps {args.warps}",
               "layers": []}
    for model in args.models.split(","):
        for name, (in_features, out_features) in layer_shapes(model).items():
            results["layers"].append(run_shape(model, name, in_features, out_features, probes, warps_list))
    results["ratios"] = ratios(results["layers"])
    print(results["ratios"], flush=True)
    write_named_result(args.out, results, "nf4-sol")


if __name__ == "__main__":
    main()
