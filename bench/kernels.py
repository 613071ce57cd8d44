"""NF4 linear-layer kernels against bf16 cuBLAS, bitsandbytes and PyTorch's tinygemm, in one run.

    python -m bench.kernels [--models 8b,1b] [--rows 1,2,4,8,16,32,64,128,256] [--out bench/results]

For each layer shape of the model (fused qkv, o, fused gate_up, down) and each row count M it times,
by CUDA-graph replay over enough weight copies to defeat the L2 cache, µs per call of:
``bf16`` (F.linear on a 16-bit weight), ``ours`` (the NF4 dispatch loraplex runs: server.model.
nf4_dispatch; at the row counts the engine tunes at start-up, nf4_autotune.ROWS, the kernel that tuning picks for
the shape, as the engine does unless LORAPLEX_NF4_AUTOTUNE=0, with ``rules``, the rule-chosen kernel, beside it and
the pick in ``tuned``), each of our kernels forced (``fused``, ``dequant``, ``mma``, ``tile``, ``wide`` and, with
--sweep-mma, the tile and wide kernels' neighbours), ``bnb`` (bitsandbytes.matmul_4bit) and ``tinygemm``
(torch._weight_int4pack_mm, int4, group 64: a speed reference only, not NF4). Each of ours is also
checked against the float64 reference.
Writes ``<out>/<date>-<device>-kernels.json`` with ``ratios`` (geometric means over the four layer
shapes of the 8B model): nf4_over_bf16_m{1,16,32,128}, nf4_over_tinygemm_m1.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.results import write_named_result
from bench.shapes import SHAPES

L2_DEFEAT_BYTES = 256 << 20  # weight bytes cycled through per timed pass (H200 L2: 60 MB)
CALLS_PER_GRAPH = 24
SWEEP_MMA = False  # --sweep-mma: also time the CUDA kernel's warps and split-K neighbours


def _mma_available() -> bool:
    from server.kernels.nf4 import cuda_nf4

    return cuda_nf4.is_available()


def _wgmma_available() -> bool:
    from server.kernels.nf4 import cuda_nf4_wgmma

    return cuda_nf4_wgmma.wgmma_supported()


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each fused linear of one transformer layer."""
    cfg = SHAPES[model]
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    return {"qkv": (hidden, qkv), "o": (cfg["num_attention_heads"] * head_dim, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def capture_calls(fns: list, calls: list) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` in order, after one eager call of each of `fns` (compiled and warmed outside it)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def time_calls(fns: list, reps: int = 10) -> float:
    """Median µs per call of `fns` (cycled CALLS_PER_GRAPH times) replayed as one CUDA graph."""
    calls = [fns[i % len(fns)] for i in range(max(CALLS_PER_GRAPH, len(fns)))]
    graph = capture_calls(fns, calls)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) * 1000 / len(calls))
    return sorted(times)[len(times) // 2]


class Layer:
    """One weight in every representation the implementations need (several copies)."""

    def __init__(self, in_features: int, out_features: int, copies: int, seed: int):
        import bitsandbytes.functional as bnbf

        from server.kernels.nf4.nf4_layout import tile_pack
        from server.kernels.nf4.nf4_ops import nf4_absmax_float

        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.shape = (out_features, in_features)
        self.bf16, self.nf4, self.int4 = [], [], []
        for _ in range(copies):
            w = (torch.randn(out_features, in_features, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
            codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            absmax = nf4_absmax_float(state).contiguous()
            self.nf4.append((codes, absmax, state, tile_pack(codes, absmax, self.shape)))
            self.bf16.append(w)
            self.int4.append(_tinygemm_pack(w))
        self.table = self.nf4[0][2].code


def timing_layer(in_features: int, out_features: int) -> Layer:
    """The weight of one layer shape in enough copies (at most 8) that a timed pass cycles L2_DEFEAT_BYTES."""
    copies = max(1, min(8, math.ceil(L2_DEFEAT_BYTES / (in_features * out_features * 2))))
    return Layer(in_features, out_features, copies=copies, seed=in_features + out_features)


def _tinygemm_pack(w: torch.Tensor, group: int = 64):
    """torch's int4 tinygemm layout of `w` (asymmetric, per-group scale and zero); None if unsupported."""
    try:
        out_features, in_features = w.shape
        groups = w.float().view(out_features, in_features // group, group)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).view(out_features, in_features)
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(packed_u8, 8)
        zero = lo + 8 * scale  # tinygemm dequantizes as (q - 8) * scale + zero
        scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()
        return packed, scales_zeros.to(torch.bfloat16), group
    except (RuntimeError, AttributeError) as err:
        return repr(err)


def implementations(layer: Layer, x: torch.Tensor) -> dict[str, list]:
    """name -> one callable per weight copy."""
    import bitsandbytes as bnb

    from server.kernels.nf4 import nf4_dispatch
    from server.kernels.nf4.nf4_dispatch import nf4_linear_cuda
    from server.kernels.nf4.triton_nf4 import device_num_sms, nf4_matmul_triton

    rows = x.shape[0]
    impls = {
        "bf16": [lambda w=w: torch.nn.functional.linear(x, w) for w in layer.bf16],
        "ours": [lambda c=c: nf4_linear_cuda(x, c[0], c[1], layer.shape, layer.table, None, c[2], tiled=c[3])
                 for c in layer.nf4],
        "bnb": [lambda c=c: bnb.matmul_4bit(x, c[0].t(), c[2]) for c in layer.nf4],
    }
    if (layer.shape, rows) in nf4_dispatch.TUNED:  # ours is the tuned pick: the rules' kernel beside it
        rule = nf4_dispatch.kernel_for(rows, layer.shape, num_sms=device_num_sms(0))
        options = nf4_dispatch.rule_options(rule, rows, layer.shape)
        impls["rules"] = [lambda c=c: nf4_linear_cuda(x, c[0], c[1], layer.shape, layer.table, None, c[2], rule,
                                                      tiled=c[3], options=options) for c in layer.nf4]
    for name in ("dequant",):
        impls[name] = [lambda c=c, n=name: nf4_linear_cuda(x, c[0], c[1], layer.shape, layer.table, None, c[2], n)
                       for c in layer.nf4]
    if rows <= 256:
        impls["fused"] = [lambda c=c: nf4_matmul_triton(x, c[0], c[1], layer.shape, layer.table)
                          for c in layer.nf4]
    if rows <= 64 and _mma_available():
        from server.kernels.nf4 import cuda_nf4, cuda_nf4_gemv

        impls["mma"] = [lambda c=c: cuda_nf4.nf4_mma(x, c[0], c[1], layer.shape, layer.table,
                                                     warps=2 if rows <= 8 else 4, num_sms=device_num_sms(0))
                        for c in layer.nf4]
        impls["tile"] = [lambda c=c: cuda_nf4.nf4_tile(x, c[3], layer.shape, layer.table, num_sms=device_num_sms(0),
                                                       pdl=False)  # plain launches, beside tile_pdl
                         for c in layer.nf4]
        if rows <= 8:  # K split among a block's warps, summed in shared memory: no second kernel
            impls["gemv"] = [lambda c=c: cuda_nf4_gemv.nf4_gemv(x, c[3], layer.shape, layer.table,
                                                                num_sms=device_num_sms(0))
                             for c in layer.nf4]
            for warps in cuda_nf4_gemv.GEMV_WARPS:  # the warps a block, each forced
                impls[f"gemv_w{warps}"] = [
                    lambda c=c, w=warps: cuda_nf4_gemv.nf4_gemv(x, c[3], layer.shape, layer.table, warps=w)
                    for c in layer.nf4]
        if rows <= 16:  # the byte-pair table on a persistent grid: its default group size, then each forced
            impls["gemv_pairs"] = [lambda c=c: cuda_nf4_gemv.nf4_gemv_pairs(x, c[3], layer.shape, layer.table,
                                                                            num_sms=device_num_sms(0))
                                   for c in layer.nf4]
            if rows <= 8:  # the other one-wait setting than the default's (cuda_nf4.one_wait_for), in one run
                one_wait = cuda_nf4.one_wait_for(8)
                impls["gemv_pairs_nw" if one_wait else "gemv_pairs_1w"] = [
                    lambda c=c: cuda_nf4_gemv.nf4_gemv_pairs(
                        x, c[3], layer.shape, layer.table, num_sms=device_num_sms(0), one_wait=not one_wait)
                    for c in layer.nf4]
            for group in cuda_nf4_gemv.GEMV_PAIRS_GROUPS:
                impls[f"gemv_pairs_g{group}"] = [
                    lambda c=c, g=group: cuda_nf4_gemv.nf4_gemv_pairs(x, c[3], layer.shape, layer.table, group_warps=g)
                    for c in layer.nf4]
        if rows <= 16:  # programmatic dependent launch: the next copy's launch and code loads overlap this tail
            impls["tile_pdl"] = [lambda c=c: cuda_nf4.nf4_tile(x, c[3], layer.shape, layer.table,
                                                               num_sms=device_num_sms(0), pdl=True)
                                 for c in layer.nf4]
        if SWEEP_MMA:  # the tile kernel's neighbours: warps, tiles a warp, split-K halved and doubled
            warps, per_warp = cuda_nf4.tile_config(rows)
            split = cuda_nf4.pick_split_k(rows, *layer.shape, device_num_sms(0), warps, rows_per_warp=per_warp)
            variants = {"tile_s_half": {"split_k": max(1, split // 2)}, "tile_s_double": {"split_k": split * 2}}
            if rows <= 8:
                variants["tile_w4"] = {"warps": 4}
            elif rows <= 32:
                variants["tile_r1"] = {"rows_per_warp": 1}
            for vname, kw in variants.items():
                impls[vname] = [lambda c=c, kw=kw: cuda_nf4.nf4_tile(x, c[3], layer.shape, layer.table,
                                                                     num_sms=device_num_sms(0), **kw)
                                for c in layer.nf4]
    if rows >= 16 and _mma_available():  # x as the MMA's A operand (not in the dispatch until measured)
        from server.kernels.nf4 import cuda_nf4

        impls["gemm"] = [lambda c=c: cuda_nf4.nf4_gemm(x, c[3], layer.shape, layer.table, num_sms=device_num_sms(0))
                         for c in layer.nf4]
    if _mma_available() and _wgmma_available():  # warpgroup MMA (sm_90a; the dispatch's at 17-256)
        from server.kernels.nf4 import cuda_nf4, cuda_nf4_wgmma
        from server.kernels.nf4.nf4_autotune import candidates

        # the wgmma variants start-up tuning would time (from 16 rows the default, each other block size that holds
        # M, one warpgroup a block, the x-resident kernel; under 16 rows its 16-token tile), then from 16 rows the
        # 32-token instance's own variants
        short = {"block_tokens": "b", "block_warps": "w", "stage_blocks": "s", "resident_warpgroups": "r", "pairs": "p",
                 "bulk_x": "bx", "cluster_sum": "cs"}
        variants = {"wgmma" + "".join(f"_{short[k]}{'' if v is True else v}" for k, v in choice.options):
                    dict(choice.options)
                    for choice in candidates(rows, layer.shape, device_num_sms(0)) if choice.kernel == "wgmma"}
        block_tokens = cuda_nf4_wgmma.wgmma_block_tokens(rows, layer.shape, device_num_sms(0))
        if rows >= 16 and block_tokens == 32:
            variants["wgmma_o2"] = {"occupancy": 2}  # the instance for two blocks an SM (the default: three)
        if rows >= 16 and block_tokens <= 128:  # the other one-wait setting than the default's (cuda_nf4.one_wait_for)
            one_wait = cuda_nf4.one_wait_for(block_tokens)
            variants["wgmma_nw" if one_wait else "wgmma_1w"] = {"one_wait": not one_wait}
        if rows > 32:  # x by the TMA unit (tuning candidates from 65 rows; the 64-token block with BULK_X_64)
            variants.setdefault("wgmma_bx", {"bulk_x": True})
            variants.setdefault("wgmma_bx_b64", {"bulk_x": True, "block_tokens": 64})
            variants.setdefault("wgmma_bx_cs", {"bulk_x": True, "cluster_sum": True})  # a tuning candidate
        for vname, kw in variants.items():
            impls[vname] = [lambda c=c, kw=kw: cuda_nf4_wgmma.nf4_wgmma(x, c[3], layer.shape, layer.table,
                                                                        num_sms=device_num_sms(0), **kw)
                            for c in layer.nf4]
    if rows <= 256 and _mma_available():
        from server.kernels.nf4 import cuda_nf4

        impls["wide"] = [lambda c=c: cuda_nf4.nf4_wide(x, c[3], layer.shape, layer.table, num_sms=device_num_sms(0))
                         for c in layer.nf4]
        if SWEEP_MMA:  # its neighbours: two row tiles a warp, the other pass width, split-K halved and doubled
            tiles, per_warp = cuda_nf4.wide_config(rows)
            other = 2 * tiles if tiles < 16 else 8  # the next wider pass, or at 16 token tiles passes of 64 rows
            split = cuda_nf4.wide_split_k(rows, layer.shape, device_num_sms(0), tiles, per_warp)
            # split-K halved and doubled: at 32 rows on gate_up the default 8 splits write and read back 29 MB
            # of fp32 partials, half the code bytes
            variants = {"wide_r2": {"rows_per_warp": 2}, f"wide_t{other}": {"token_tiles": other},
                        "wide_s_half": {"split_k": max(1, split // 2)}, "wide_s_double": {"split_k": split * 2}}
            for vname, kw in variants.items():
                impls[vname] = [lambda c=c, kw=kw: cuda_nf4.nf4_wide(x, c[3], layer.shape, layer.table,
                                                                     num_sms=device_num_sms(0), **kw)
                                for c in layer.nf4]
    if not isinstance(layer.int4[0], str):
        impls["tinygemm"] = [lambda p=p: torch._weight_int4pack_mm(x, p[0], p[2], p[1]) for p in layer.int4]
    return impls


def check_error(layer: Layer, x: torch.Tensor, fn) -> float:
    """max |y - ref| / max |ref| against the float64 reference on copy 0's weight."""
    from server.kernels.nf4.nf4_ops import nf4_dequantize_reference

    codes, absmax = layer.nf4[0][:2]
    weight = nf4_dequantize_reference(codes, absmax, layer.shape, layer.table).to(x.dtype).double()
    ref = x.double() @ weight.t()
    got = fn().double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


def tune_like_the_engine(layer: Layer, rows: int) -> str | None:
    """At the row counts the engine tunes at start-up (nf4_autotune.ROWS, unless LORAPLEX_NF4_AUTOTUNE=0), the same
    tuning over the layer's weight copies (as the engine's over the model's layers of a shape), recorded in
    nf4_dispatch.TUNED as the engine records it; the pick, or None."""
    from types import SimpleNamespace

    from server.kernels.nf4 import nf4_autotune, nf4_dispatch

    if not nf4_autotune.AUTOTUNE or rows not in nf4_autotune.ROWS or not _mma_available():
        return None
    from server.kernels.nf4.triton_nf4 import device_num_sms

    weights = [SimpleNamespace(codes=codes, absmax_f=absmax, quant_state=state, tiled=tiled,
                               compute_dtype=torch.bfloat16) for codes, absmax, state, tiled in layer.nf4]
    nf4_autotune.tune({layer.shape: weights}, device_num_sms(0), rows_list=(rows,))
    choice = nf4_dispatch.TUNED.get((layer.shape, rows))
    return None if choice is None else str(choice)


def run_model(model: str, rows_list: list[int], results: dict) -> None:
    for layer_name, (in_features, out_features) in layer_shapes(model).items():
        layer = timing_layer(in_features, out_features)
        for rows in rows_list:
            x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
            entry = {"in": in_features, "out": out_features, "rows": rows, "us": {}, "rel_err": {}, "errors": {}}
            if tuned := tune_like_the_engine(layer, rows):
                entry["tuned"] = tuned
            if isinstance(layer.int4[0], str):
                entry["errors"]["tinygemm"] = layer.int4[0]
            for name, fns in implementations(layer, x).items():
                try:
                    entry["us"][name] = round(time_calls(fns), 2)
                    if name not in ("bf16", "tinygemm"):
                        entry["rel_err"][name] = check_error(layer, x, fns[0])
                except Exception as err:  # record and go on: one broken variant must not end the run
                    entry["errors"][name] = f"{type(err).__name__}: {err}"[:300]
            results["layers"].append({"model": model, "layer": layer_name, **entry})
            print(model, layer_name, rows, {k: v for k, v in entry["us"].items()}, entry.get("tuned", ""),
                  entry["errors"] or "", flush=True)
        del layer
        torch.cuda.empty_cache()


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def ratios(results: dict) -> dict[str, float | None]:
    out = {}
    rows8b = [r for r in results["layers"] if r["model"] == "8b"]
    for m in (1, 16, 32, 128):
        vals = [r["us"]["ours"] / r["us"]["bf16"] for r in rows8b if r["rows"] == m and "ours" in r["us"]]
        out[f"nf4_over_bf16_m{m}"] = round(geomean(vals), 3) if len(vals) == 4 else None
    vals = [r["us"]["ours"] / r["us"]["tinygemm"] for r in rows8b
            if r["rows"] == 1 and "ours" in r["us"] and "tinygemm" in r["us"]]
    out["nf4_over_tinygemm_m1"] = round(geomean(vals), 3) if len(vals) == 4 else None
    return out


def cluster_occupancy() -> dict[int, int] | str:
    """Clusters of 2, 4 and 8 cluster-summing bulk_x blocks the GPU holds at once (cudaOccupancyMaxActiveClusters),
    beside the SMs' two blocks each: where fewer fit than a grid's clusters, it runs in more than one wave."""
    from server.kernels.nf4 import cuda_nf4, cuda_nf4_wgmma

    if not cuda_nf4_wgmma.wgmma_supported():
        return "no wgmma kernels in this build"
    try:
        return {splits: cuda_nf4.extension().nf4_wgmma_cluster_occupancy(splits) for splits in (2, 4, 8)}
    except RuntimeError as err:  # recorded, not fatal: the table above is the run's point
        return repr(err)[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="8b,1b")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--sweep-mma", action="store_true")
    args = parser.parse_args()
    global SWEEP_MMA
    SWEEP_MMA = args.sweep_mma
    device = torch.cuda.get_device_name(0)
    results = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
               "command": "python -m bench.kernels " + f"--models {args.models} --rows {args.rows}", "layers": []}
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    for model in args.models.split(","):
        run_model(model, [int(r) for r in args.rows.split(",")], results)
    results["cluster_occupancy"] = cluster_occupancy()
    results["ratios"] = ratios(results)
    write_named_result(args.out, results, "kernels")


if __name__ == "__main__":
    main()
