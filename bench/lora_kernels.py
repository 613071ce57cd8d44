"""The LoRA shrink and expand kernels of one decode step, against their bandwidth floor, with a launch sweep.

    python -m bench.lora_kernels [--models 8b,1b] [--scenarios decode32,single32,decode1,prefill32] [--out DIR]

For each LoRA linear of a transformer layer (qkv, o, gate_up, down; rank-16 adapters, pool sized for 32 of
them as `python -m bench` builds it) and each batch scenario it times, by CUDA-graph replay over enough pool
copies to defeat the L2 cache (a real step reads 32 layers' pools, never cached), µs per call of:
``shrink`` and ``expand`` alone and ``apply`` (both, as `lora_apply_triton` runs them) under the default launch
choices, then each launch override of SHRINK_SWEEP / EXPAND_SWEEP one at a time, and ``apply`` again with the
best of each. Every configuration is checked against `lora_apply_reference` first.
Scenarios: ``decode32`` 32 tokens of 32 distinct adapters (the mixed-32 step), ``single32`` 32 tokens of one
adapter, ``decode1`` one token; ``prefill32`` 32 prompts of 128 tokens, one adapter each (the first step of
`python -m bench`'s mixed-32 run, which cost 48-95 ms against 21-35 merged on the 8B shape), ``prefill1`` 4,096
tokens of one adapter. Floor = bytes of the adapters the batch uses (A and B) / the copy bandwidth measured in
the same run; prefill scenarios add the activations (x read, y read and written), and time the default launch
only (no sweep: the reference check of each variant is a Python loop over 4,096 tokens).
For ``decode32`` it also times the dense cuBLAS form of the same apply (``dense``: bench.lora_dense).
For one-token scenarios of linears of several slices (qkv, gate_up in decode32 and decode1) it also times the
side-stream split of LORAPLEX_LORA_SIDE_EXPAND (``side``): ``delta`` (`lora_delta`, beside the base matmul) and
``join`` (`lora_add_delta` into a plain output, after it), checked bit for bit against the expand.
Writes ``<out>/<date>-<device>-lora-kernels.json``; its ``ratios`` hold, for the 8B decode32 step summed over
the four linears, ``lora_floor_fraction_decode32_8b`` (floor / default apply time) and
``lora_best_floor_fraction_decode32_8b`` (floor / the best overrides' apply time).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.kernels import L2_DEFEAT_BYTES, layer_shapes, time_calls
from bench.lora_dense import dense_apply, time_dense
from bench.results import write_named_result

RANK = 16
NUM_ADAPTERS = 32
DEVICE = "cuda"  # a CPU smoke test (tests/unit) runs it on "cpu" under the Triton interpreter
SCENARIOS = {"decode32": ([1] * 32, list(range(32))), "single32": ([32], [0]), "decode1": ([1], [0]),
             "prefill32": ([128] * 32, list(range(32))), "prefill1": ([4096], [0])}
# One override at a time, from the default launch (see server.kernels.lora.triton_lora).
SHRINK_SWEEP = {
    "w2": {"num_warps": 2}, "w8": {"num_warps": 8}, "k64": {"block_k": 64}, "k256": {"block_k": 256},
    "p264": {"target_programs": 264}, "p1056": {"target_programs": 1056}, "p2112": {"target_programs": 2112},
    "s1": {"num_stages": 1}, "s2": {"num_stages": 2},
    "m1": {"block_m": 1}, "m1_k256": {"block_m": 1, "block_k": 256}, "m1_k512_w2": {"block_m": 1, "block_k": 512,
                                                                               "num_warps": 2},
    "m1_p1056": {"block_m": 1, "target_programs": 1056}, "m1_s1": {"block_m": 1, "num_stages": 1},
    "m16": {"block_m": 16},  # the tensor-core tile, the default before one program per token (up to 32 tokens)
    # fewer columns a program (the default takes a slot's n * rank columns up to 64: qkv's 48 in 64, a quarter masked),
    # so more programs a token and longer K walks at the same program count
    "n16": {"block_n": 16}, "n32": {"block_n": 32}, "n16_w2": {"block_n": 16, "num_warps": 2},
}
EXPAND_SWEEP = {
    "n64": {"block_n": 64}, "n128": {"block_n": 128}, "n512": {"block_n": 512}, "w2": {"num_warps": 2},
    "w8": {"num_warps": 8}, "s1": {"num_stages": 1},
    "m1": {"block_m": 1}, "m1_n64": {"block_m": 1, "block_n": 64}, "m1_n128": {"block_m": 1, "block_n": 128},
    "m1_n512_w8": {"block_m": 1, "block_n": 512, "num_warps": 8},
    # LORAPLEX_LORA_ONE_ROW's launches: 16 bytes of columns a thread, so the rank sum stays within it
    "m1_n256_w1": {"block_m": 1, "block_n": 256, "num_warps": 1}, "m1_n512_w2": {"block_m": 1, "block_n": 512,
                                                                                "num_warps": 2},
    "m1_n1024_w4": {"block_m": 1, "block_n": 1024, "num_warps": 4},
    "m1_n2048_w8": {"block_m": 1, "block_n": 2048, "num_warps": 8},
}


def linear_slices(model: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (in_features, slice offsets of the fused output) for the four LoRA linears of a layer."""
    from bench.shapes import SHAPES

    cfg = SHAPES[model]
    head_dim, hidden, inter = cfg["head_dim"], cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = layer_shapes(model)
    return {"qkv": (shapes["qkv"][0], (0, q, q + kv, q + 2 * kv)), "o": (shapes["o"][0], (0, hidden)),
            "gate_up": (shapes["gate_up"][0], (0, inter, 2 * inter)), "down": (shapes["down"][0], (0, hidden))}


class Pools:
    """`copies` rank pools of one LoRA linear (A [n * capacity, in], B [capacity, out], bf16), 32 slots of rank 16."""

    def __init__(self, in_features: int, slice_offsets: tuple[int, ...], copies: int, seed: int):
        from server.kernels.lora.lora_meta import SlotLayout

        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.num_slices, self.slice_offsets = len(slice_offsets) - 1, slice_offsets
        capacity = NUM_ADAPTERS * RANK
        self.a = [(torch.randn(self.num_slices * capacity, in_features, device=DEVICE, generator=gen) / 64)
                  .to(torch.bfloat16) for _ in range(copies)]
        self.b = [(torch.randn(capacity, slice_offsets[-1], device=DEVICE, generator=gen) / 4).to(torch.bfloat16)
                  for _ in range(copies)]
        self.layout = SlotLayout.from_lists([RANK * s for s in range(NUM_ADAPTERS)], [RANK] * NUM_ADAPTERS, RANK,
                                            DEVICE)

    def bytes_used(self, num_adapters: int) -> int:
        """A and B bytes of `num_adapters` adapters: what a batch using them must read."""
        in_features, out_features = self.a[0].shape[1], self.b[0].shape[1]
        return num_adapters * RANK * (self.num_slices * in_features + out_features) * 2


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    return 2 * (2 << 30) / seconds


def apply_error(pools: Pools, x, meta, apply) -> float:
    """max |ours - reference| / max |reference| of one apply on copy 0: apply(y) adds the delta into y in place."""
    from server.kernels.lora.lora_ops import lora_apply_reference

    y0 = torch.randn(x.shape[0], pools.slice_offsets[-1], device=x.device).to(torch.bfloat16)
    expected, actual = y0.float(), y0.clone()
    lora_apply_reference(expected, x.float(), pools.a[0].float(), pools.b[0].float(), pools.layout, meta,
                         pools.slice_offsets)
    apply(actual)
    return ((actual.float() - expected).abs().max() / (expected - y0.float()).abs().max()).item()


def check(pools: Pools, x, meta, shrink_tuning, expand_tuning) -> float:
    """apply_error of the Triton shrink and expand under these launch choices."""
    from server.kernels.lora import triton_lora

    def apply(y):
        h = triton_lora.lora_shrink(x, pools.a[0], pools.layout, meta, pools.num_slices, tuning=shrink_tuning)
        triton_lora.lora_expand(y, h, pools.b[0], pools.layout, meta, pools.slice_offsets, tuning=expand_tuning)

    return apply_error(pools, x, meta, apply)


def time_variant(pools: Pools, x, meta, shrink_tuning: dict, expand_tuning: dict) -> dict[str, float]:
    """µs per call of shrink alone, expand alone and both."""
    from server.kernels.lora import triton_lora

    y = torch.zeros(x.shape[0], pools.slice_offsets[-1], device=DEVICE, dtype=torch.bfloat16)
    hs = [triton_lora.lora_shrink(x, a, pools.layout, meta, pools.num_slices, tuning=shrink_tuning) for a in pools.a]
    shrink = [lambda a=a: triton_lora.lora_shrink(x, a, pools.layout, meta, pools.num_slices, tuning=shrink_tuning)
              for a in pools.a]
    expand = [lambda h=h, b=b: triton_lora.lora_expand(y, h, b, pools.layout, meta, pools.slice_offsets,
                                                       tuning=expand_tuning) for h, b in zip(hs, pools.b, strict=True)]

    def both(a, b):
        h = triton_lora.lora_shrink(x, a, pools.layout, meta, pools.num_slices, tuning=shrink_tuning)
        triton_lora.lora_expand(y, h, b, pools.layout, meta, pools.slice_offsets, tuning=expand_tuning)

    apply = [lambda a=a, b=b: both(a, b) for a, b in zip(pools.a, pools.b, strict=True)]
    return {"shrink": time_calls(shrink), "expand": time_calls(expand), "apply": time_calls(apply)}


def time_side(pools: Pools, x, meta) -> dict[str, float | bool]:
    """µs per call of lora_delta and of lora_add_delta (a plain output), and whether the two give the expand's bits."""
    from server.kernels.lora import triton_lora, triton_lora_decode

    y = torch.randn(x.shape[0], pools.slice_offsets[-1], device=DEVICE).to(torch.bfloat16)
    hs = [triton_lora.lora_shrink(x, a, pools.layout, meta, pools.num_slices) for a in pools.a]
    deltas = [triton_lora_decode.lora_delta(h, b, pools.layout, meta, pools.slice_offsets)
              for h, b in zip(hs, pools.b, strict=True)]
    expected = y.clone()
    triton_lora.lora_expand(expected, hs[0], pools.b[0], pools.layout, meta, pools.slice_offsets)
    exact = torch.equal(triton_lora_decode.lora_add_delta(y.clone(), deltas[0], meta), expected)
    delta = [lambda h=h, b=b: triton_lora_decode.lora_delta(h, b, pools.layout, meta, pools.slice_offsets)
             for h, b in zip(hs, pools.b, strict=True)]
    join = [lambda d=d: triton_lora_decode.lora_add_delta(y, d, meta) for d in deltas]
    return {"delta": round(time_calls(delta), 2), "join": round(time_calls(join), 2), "bit_exact": exact}


def run_linear(model: str, name: str, in_features: int, slice_offsets, scenarios: list[str], bandwidth: float,
               results: dict) -> None:
    from server.kernels.lora.lora_meta import make_lora_meta

    per_copy = NUM_ADAPTERS * RANK * ((len(slice_offsets) - 1) * in_features + slice_offsets[-1]) * 2
    pools = Pools(in_features, slice_offsets, copies=max(2, min(16, math.ceil(L2_DEFEAT_BYTES / per_copy))),
                  seed=in_features + slice_offsets[-1])
    for scenario in scenarios:
        seg_lens, seg_slots = SCENARIOS[scenario]
        meta = make_lora_meta(seg_lens, seg_slots, DEVICE)
        tokens = sum(seg_lens)
        x = torch.randn(tokens, in_features, device=DEVICE).to(torch.bfloat16)
        floor_bytes = pools.bytes_used(len(set(seg_slots)))
        is_prefill = scenario.startswith("prefill")
        if is_prefill:
            floor_bytes += tokens * (in_features + 2 * slice_offsets[-1]) * 2
        floor_us = floor_bytes / bandwidth * 1e6
        entry = {"model": model, "linear": name, "scenario": scenario, "floor_us": round(floor_us, 2),
                 "shrink": {}, "expand": {}, "apply": {}, "rel_err": {}, "errors": {}}
        variants = {"default": ({}, {})}
        if not is_prefill:
            variants |= {f"shrink_{k}": (v, {}) for k, v in SHRINK_SWEEP.items()}
            variants |= {f"expand_{k}": ({}, v) for k, v in EXPAND_SWEEP.items()}
        for vname, (st, et) in variants.items():
            try:
                entry["rel_err"][vname] = round(check(pools, x, meta, st, et), 5)
                times = time_variant(pools, x, meta, st, et)
            except Exception as err:  # one broken variant must not end the run
                entry["errors"][vname] = f"{type(err).__name__}: {err}"[:300]
                continue
            if vname == "default" or vname.startswith("shrink_"):
                entry["shrink"][vname] = round(times["shrink"], 2)
            if vname == "default" or vname.startswith("expand_"):
                entry["expand"][vname] = round(times["expand"], 2)
            entry["apply"][vname] = round(times["apply"], 2)
        best_s = min(entry["shrink"], key=entry["shrink"].get, default="default")
        best_e = min(entry["expand"], key=entry["expand"].get, default="default")
        st = SHRINK_SWEEP.get(best_s.removeprefix("shrink_"), {})
        et = EXPAND_SWEEP.get(best_e.removeprefix("expand_"), {})
        try:
            entry["rel_err"]["best"] = round(check(pools, x, meta, st, et), 5)
            entry["apply"]["best"] = round(time_variant(pools, x, meta, st, et)["apply"], 2)
        except Exception as err:
            entry["errors"]["best"] = f"{type(err).__name__}: {err}"[:300]
        entry["best"] = {"shrink": best_s, "expand": best_e}
        if scenario == "decode32":  # every slot in use once: the dense cuBLAS form (bench.lora_dense)
            try:
                rel_err = apply_error(pools, x, meta, dense_apply(pools, x, meta))
                entry["dense"] = {**time_dense(pools, x, meta), "rel_err": round(rel_err, 5)}
            except Exception as err:
                entry["errors"]["dense"] = f"{type(err).__name__}: {err}"[:300]
        if len(slice_offsets) > 2 and max(seg_lens) == 1:
            try:
                entry["side"] = time_side(pools, x, meta)
            except Exception as err:
                entry["errors"]["side"] = f"{type(err).__name__}: {err}"[:300]
        results["linears"].append(entry)
        print(model, name, scenario, "floor", entry["floor_us"], "default", entry["apply"].get("default"),
              "best", entry["apply"].get("best"), entry["best"], entry.get("dense", ""), entry["errors"] or "",
              flush=True)
    del pools
    torch.cuda.empty_cache()


def ratios(results: dict) -> dict[str, float | None]:
    rows = [r for r in results["linears"] if r["model"] == "8b" and r["scenario"] == "decode32"]
    if len(rows) != 4 or any("default" not in r["apply"] or "best" not in r["apply"] for r in rows):
        return {}
    floor = sum(r["floor_us"] for r in rows)
    return {"lora_floor_fraction_decode32_8b": round(floor / sum(r["apply"]["default"] for r in rows), 3),
            "lora_best_floor_fraction_decode32_8b": round(floor / sum(r["apply"]["best"] for r in rows), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="8b,1b")
    parser.add_argument("--scenarios", default="decode32,single32,decode1")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.lora_kernels needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "rank": RANK,
               "adapters": NUM_ADAPTERS, "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
               "command": "python -m bench.lora_kernels --models " + args.models + " --scenarios " + args.scenarios,
               "linears": []}
    print("copy bandwidth GB/s", results["copy_bandwidth_gbs"], flush=True)
    for model in args.models.split(","):
        for name, (in_features, slice_offsets) in linear_slices(model).items():
            run_linear(model, name, in_features, slice_offsets, args.scenarios.split(","), bandwidth, results)
    results["ratios"] = ratios(results)
    write_named_result(args.out, results, "lora-kernels")


if __name__ == "__main__":
    main()
