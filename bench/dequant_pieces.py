"""`python -m bench.dequant_pieces`: NF4 dequant + cuBLAS over the whole weight against pieces of output rows.

The dispatch's `dequant` path (server.model.nf4_dispatch.dequant_linear) writes the weight in 16 bits into a
scratch buffer that cuBLAS then reads: 2 bytes a weight each way, 2.0-2.3x the time of bf16 weights at 128 rows
on the H200 (bench/RESULTS.md). In pieces of output rows whose 16-bit copy fits in L2 (LORAPLEX_DEQUANT_CHUNK_MB)
that traffic may stay on chip. This times, for every linear of a layer (8B and 1B shapes) and each row count, by
CUDA-graph replay over enough weight copies to defeat L2 (bench.kernels.time_calls), in µs per call: bf16 cuBLAS,
`dequant_linear` whole, and `dequant_linear` in pieces of each size; each piece size's output is checked against
the whole one's. Writes ``<date>-<device>-dequant-pieces.json``; its ``ratios`` hold, for the 8B shape at 128 rows
(geometric mean over the four linears), ``dequant_over_bf16_m128`` and, for each piece size,
``pieces_<mb>mb_over_bf16_m128``. A timing tool, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.build import device_name
from bench.kernels import L2_DEFEAT_BYTES, geomean, layer_shapes, time_calls
from bench.results import write_named_result
from server.model.nf4_dispatch import dequant_linear

DEVICE = "cuda"  # a CPU smoke test (tests/unit) runs it on "cpu" under the Triton interpreter


def _copies(bytes_each: int) -> int:
    return max(2, L2_DEFEAT_BYTES // bytes_each)


def measure_layer(in_features: int, out_features: int, rows: list[int], piece_mbs: list[float]) -> list[dict]:
    """One entry per row count: µs of bf16, whole and each piece size, and each piece size's largest difference
    from the whole output."""
    device, shape = torch.device(DEVICE), (out_features, in_features)
    numel = out_features * in_features
    table = torch.linspace(-1.0, 1.0, 16, device=device)
    gen = torch.Generator(device=device).manual_seed(numel % 9973)
    codes = [torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, device=device, generator=gen)
             for _ in range(_copies(numel // 2))]
    scales = [torch.rand(numel // 64, device=device, generator=gen) for _ in codes]
    weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(_copies(2 * numel))]
    entries = []
    for num_rows in rows:
        x = torch.randn(num_rows, in_features, device=device, dtype=torch.bfloat16, generator=gen)
        entry = {"in": in_features, "out": out_features, "rows": num_rows}
        entries.append({**entry, **_time_rows(x, codes, scales, weights, shape, table, piece_mbs)})
    return entries


def _time_rows(x, codes, scales, weights, shape, table, piece_mbs: list[float]) -> dict:
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    times, diffs = {"bf16": time_calls([lambda w=w: torch.mm(x, w.t(), out=out) for w in weights])}, {}

    def run(i, chunk_bytes):
        return dequant_linear(x, codes[i], scales[i], shape, table, None, chunk_bytes=chunk_bytes)

    times["whole"] = time_calls([lambda i=i: run(i, 0) for i in range(len(codes))])
    whole = run(0, 0).float()
    for mb in piece_mbs:
        chunk_bytes = int(mb * (1 << 20))
        if chunk_bytes >= 2 * shape[0] * shape[1]:
            continue  # one piece: the whole path
        name = f"{mb:g}mb"
        times[name] = time_calls([lambda i=i, c=chunk_bytes: run(i, c) for i in range(len(codes))])
        diffs[name] = (run(0, chunk_bytes).float() - whole).abs().max().item()
    return {"us": times, "max_abs_diff": diffs}


def ratios(layers: list[dict], piece_mbs: list[float]) -> dict:
    """8B, 128 rows: geometric means over the linears of whole / bf16 and each piece size / bf16 (a linear whose
    weight fits one piece counts at its whole time)."""
    at_128 = [e for e in layers if e["model"] == "8b" and e["rows"] == 128]
    result = {"dequant_over_bf16_m128": geomean([e["us"]["whole"] / e["us"]["bf16"] for e in at_128])}
    for mb in piece_mbs:
        name = f"{mb:g}mb"
        result[f"pieces_{name}_over_bf16_m128"] = geomean(
            [e["us"].get(name, e["us"]["whole"]) / e["us"]["bf16"] for e in at_128])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="8b,1b")
    parser.add_argument("--rows", default="128,192,1024")
    parser.add_argument("--piece-mb", default="32,16,8")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    piece_mbs = [float(mb) for mb in args.piece_mb.split(",")]
    layers = []
    for model in args.models.split(","):
        for name, (in_features, out_features) in layer_shapes(model).items():
            for entry in measure_layer(in_features, out_features, rows, piece_mbs):
                layers.append({"model": model, "layer": name, **entry})
                print(layers[-1], flush=True)
    device = torch.device("cuda")
    command = " ".join(["python -m bench.dequant_pieces", *(sys.argv[1:] if argv is None else argv)])
    record = {"date": time.strftime("%Y-%m-%d"), "device": device_name(device), "torch": torch.__version__,
              "command": command,
              "layers": layers, "ratios": ratios(layers, piece_mbs)}
    write_named_result(args.out, record, "dequant-pieces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
