"""The NF4-kernels part of bench/RESULTS.md: issue 14's ratios, each from the newest ``*-kernels.json``
(``python -m bench.kernels``) or 8B engine run that measured it, and the per-row-count table of the newest
kernels run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.results import Ratio, fmt

KERNEL_RATIOS = (
    Ratio("nf4_over_bf16_m1", "8b", "NF4 linear / bf16 cuBLAS time, 1 row (geomean of the 4 layer shapes)", "<=", 0.45),
    Ratio("nf4_over_bf16_m16", "8b", "same, 16 rows", "<=", 0.45),
    Ratio("nf4_over_bf16_m32", "8b", "same, 32 rows", "<=", 0.50),
    Ratio("nf4_over_bf16_m128", "8b", "same, 128 rows", "<=", 1.0),
    Ratio("nf4_over_tinygemm_m1", "8b", "NF4 linear / PyTorch tinygemm int4 (g=64) time, 1 row", "<=", 1.0),
)
ENGINE_RATIOS = (  # read from the 8B engine run (python -m bench --model 8b)
    Ratio("b1_tokens_per_s_8b", "8b", "8B batch-1 decode tokens/s (base_b1)", ">=", 300),
    Ratio("swap_bit_exact", "8b", "merged swaps restore NF4 codes and absmax bit for bit", "==", True),
    Ratio("swap_ms_8b", "8b", "merged swap, all-linear rank 16, median ms", "<=", 250),
    Ratio("mixed32_over_merged_8b", "8b", "32 distinct adapters / one merged, tokens/s, batch 32", ">=", 0.80),
)
PREFILL_RATIOS = (  # read from the newest prefill run (python -m bench.prefill)
    Ratio("prefill_unequal_over_equal_8b", "8b", "32 prompts of 256-3,840 tokens / all 2,048, same total, NF4 prefill",
          "<=", 1.1),
    Ratio("prefill_tflops_8b", "8b", "model TFLOP/s of NF4 prefill, 32 x 2,048 tokens", ">=", 550),
)
IMPLS = ("ours", "bnb", "tinygemm", "tile", "wide", "pair", "lut", "mma", "fused", "fused_bytes", "fused_words", "gemv",
         "gemv_pairs", "gemm", "wgmma", "dequant")


def kernel_runs(results_dir: Path) -> list[tuple[str, dict]]:
    """(file name, data) of every kernels result that carries ratios, newest first: by date, then by the time the
    run wrote (files from before runs recorded it have none and count as older), then the plain ``-kernels.json``
    of a date before its tagged sweeps, then name. H100 runs are left out: issue 14's targets are the H200's, and
    each ratio is over bf16 on the same card (bf16 gate_up at 64 rows: 87 us on an H100, 62 on an H200), so an
    H100 run's ratios and rows would stand for figures the H200 never gave."""
    found = []
    for path in results_dir.glob("*-kernels*.json"):
        if "-h100-" in path.name:
            continue
        data = json.loads(path.read_text())
        if data.get("ratios") and "layers" in data:  # bench.kernels' (not bench.lora_kernels')
            order = (data.get("date", ""), data.get("timestamp", ""), path.name.endswith("-kernels.json"), path.name)
            found.append((order, path.name, data))
    return [(name, data) for _, name, data in sorted(found, key=lambda f: f[0], reverse=True)]


def newest_with_ratios(results_dir: Path, pattern: str, key: str | None = None,
                       gpu_only: bool = False) -> tuple[str, dict] | None:
    """(file name, data) of the newest file matching `pattern` that carries ratios, with `key` among them not null
    when given, from an H100/H200 run when `gpu_only` (by date, then the time it was written where it says, then
    name). Runs marked `"ab"` (an A/B of a setting other than the default, e.g. a prefill hold) never stand for a
    target."""
    found = [(json.loads(p.read_text()), p.name) for p in results_dir.glob(pattern)
             if not gpu_only or "h200" in p.name or "h100" in p.name]
    found = [(data, name) for data, name in found if not data.get("ab")]
    found = [((str(data.get("date", "")), str(data.get("timestamp", "")), name), name, data) for data, name in found
             if data.get("ratios") and (key is None or data["ratios"].get(key) is not None)]
    newest = max(found, key=lambda f: f[0]) if found else None
    return (newest[1], newest[2]) if newest else None


def _engine_values(runs: dict) -> dict[str, tuple[str | None, object]]:
    """ratio key -> (file, value) from the newest GPU 8B run that measured it (a run short of time skips some)."""
    found: dict[str, tuple[str | None, object]] = {}
    for name, data in runs.get("8b", []):
        if ("h200" not in name and "h100" not in name) or data.get("ab"):
            continue
        ours = data.get("ours") or {}
        ratios = data.get("ratios") or {}
        values = {"b1_tokens_per_s_8b": (ours.get("base_b1") or {}).get("tokens_per_s"),
                  **{k: ratios.get(k) for k in ("swap_bit_exact", "swap_ms_8b", "mixed32_over_merged_8b")}}
        for key, value in values.items():
            if value is not None and key not in found:
                found[key] = (name, value)
    return found


def target_row(ratio: Ratio, value, source: str | None) -> str:
    """One row of a targets table: the ratio, its value and whether it meets the target, the file it came from."""
    met = ratio.is_met(value)
    met_text = "—" if met is None else ("yes" if met else "**no**")
    src = f"`results/{source}`" if source and value is not None else "—"
    shown = fmt(value)
    if isinstance(value, float) and met is False and ratio.is_met(float(shown.replace(",", ""))):
        shown = f"{value:,.2f}"  # 299.5 printed as 300 beside "no" reads as a contradiction
    return f"| `{ratio.key}` | {ratio.description} | {ratio.target_text} | {shown} | {met_text} | {src} |"


def newest_layers(kernels: list[tuple[str, dict]], model: str) -> list[dict]:
    """The model's layer rows, each row count from the newest kernels run that timed it (a run may time a few)."""
    layers, seen = [], set()
    for _, data in kernels:
        rows = [r for r in data["layers"] if r["model"] == model and r["rows"] not in seen]
        layers += rows
        seen |= {r["rows"] for r in rows}
    return layers


def kernel_section(results_dir: Path, runs: dict) -> list[str]:
    kernels = kernel_runs(results_dir)
    lines = ["## NF4 kernels (issue 14)", ""]
    if not kernels:
        return lines + ["No `python -m bench.kernels` run committed yet.", ""]
    name, data = kernels[0]
    lines += [f"Newest kernel run: `results/{name}` ({data.get('device')}, {data.get('date')}, torch "
              f"{data.get('torch')}, triton {data.get('triton', '?')}; `{data.get('command')}`). Times by CUDA-graph "
              "replay over enough weight copies to defeat the L2 cache; `ours` is the dispatch loraplex runs"
              + (" (at the engine's tuned row counts, the start-up tuning's pick; `rules` beside it)."
                 if any("tuned" in layer for layer in data.get("layers", [])) else "."), "",
              "| ratio | what | target | measured | met | source |", "|---|---|---|---|---|---|"]
    for ratio in KERNEL_RATIOS:  # each from the newest run that measured it (a run may skip some row counts)
        source, value = next(((n, d["ratios"][ratio.key]) for n, d in kernels
                              if d["ratios"].get(ratio.key) is not None), (None, None))
        lines.append(target_row(ratio, value, source))
    engine = _engine_values(runs)
    for ratio in ENGINE_RATIOS:
        source, value = engine.get(ratio.key, (None, None))
        lines.append(target_row(ratio, value, source))
    prefill = newest_with_ratios(results_dir, "*-prefill.json")
    prefill_name, prefill_data = prefill if prefill else (None, {})
    lines += [target_row(r, (prefill_data.get("ratios") or {}).get(r.key), prefill_name) for r in PREFILL_RATIOS]
    lines.append("")
    for model in ("8b", "1b"):
        layers = newest_layers(kernels, model)
        if not layers:
            continue
        present = [i for i in IMPLS if any(i in r["us"] for r in layers)]
        lines += [f"Time over bf16 cuBLAS, geometric mean over the 4 layer shapes, {model} "
                  "(lower is better; < 1 beats 16-bit weights; each row count from the newest run that timed it):", "",
                  "| rows | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
        for rows in sorted({r["rows"] for r in layers}):
            at = [r for r in layers if r["rows"] == rows]
            cells = []
            for impl in present:
                vals = [r["us"][impl] / r["us"]["bf16"] for r in at if impl in r["us"]]
                cells.append(f"{math.exp(sum(map(math.log, vals)) / len(vals)):.2f}" if len(vals) == len(at) else "—")
            lines.append(f"| {rows} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
