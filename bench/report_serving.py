"""The serving part of bench/RESULTS.md (issue 13): every `python -m bench.serve` run and step profile
committed under bench/results, one row each, newest first."""

from __future__ import annotations

import json
from pathlib import Path

from bench.results import fmt

SERVE_FIELDS = ("tokens_per_s", "ttft_ms_p50", "itl_ms_p50")


def _serve_row(name: str, data: dict) -> str:
    server, engine = data.get("server", {}), data.get("engine", {})
    cells = []
    for load in ("unmerged/greedy", "unmerged/sampled"):
        measured = server.get(load, {})
        cells += [fmt(measured.get(f)) if "tokens_per_s" in measured else "—" for f in SERVE_FIELDS]
    step = (engine.get("unmerged/greedy") or {}).get("decode_step_ms_median")
    ratios = data.get("ratios") or {}
    shape = data.get("shape", "1b")
    serve_ratio, itl_ratio = ratios.get(f"serve_over_engine_{shape}_c32"), ratios.get(f"itl_p50_over_step_{shape}_c32")
    return f"| `{name}` | " + " | ".join(cells) + f" | {fmt(step)} | {fmt(serve_ratio)} | {fmt(itl_ratio)} |"


def serving_section(results_dir: Path) -> list[str]:
    serves = sorted(results_dir.glob("*-serve-c32-*.json"), key=lambda p: p.name, reverse=True)
    profiles = sorted(results_dir.glob("*-profile.json"), key=lambda p: p.name, reverse=True)
    lines = ["## Serving (issue 13)", ""]
    if not serves and not profiles:
        return lines + ["No `python -m bench.serve` run committed yet.", ""]
    lines += ["`python -m bench.serve --model 1b --preset c32` (32 rank-16 adapters over HTTP, 32 streams, prompt "
              "128, output 64; the file name's tag says the server flags: `proc` = `--engine-process`, `gil` = "
              "`--gil-switch-interval-ms 0.5`). Targets: serve/engine >= 0.90, ITL p50 / engine step <= 1.1, "
              "sampled / greedy >= 0.95. A dash: the load was skipped for time.", "",
              "| run | greedy tok/s | TTFT p50 ms | ITL p50 ms | sampled tok/s | TTFT p50 ms | ITL p50 ms | "
              "engine step ms | serve / engine | ITL / step |", "|---|" + "---|" * 9]
    lines += [_serve_row(p.name, json.loads(p.read_text())) for p in serves]
    lines.append("")
    if profiles:
        lines += ["GPU time of one decode step by kernel kind (`python -m bench.profile_step`; target "
                  "`decode_step_ms_b32_1b` <= 1.5 and glue <= 0.10 of the step):", "",
                  "| run | step ms (GPU) | glue fraction | NF4 ms | attention ms | 16-bit matmul ms | glue ms |",
                  "|---|---|---|---|---|---|---|"]
        for path in profiles:
            data = json.loads(path.read_text())
            kinds = data.get("ms_per_step", {})
            glue = kinds.get("fused_glue", 0.0) + kinds.get("other_glue", 0.0)
            lines.append(f"| `{path.name}` | {fmt(data.get('total_ms_per_step'))} | {fmt(data.get('glue_fraction'))} "
                         f"| {fmt(kinds.get('nf4_matmul'))} | {fmt(kinds.get('attention'))} | "
                         f"{fmt(kinds.get('matmul_16bit'))} | {fmt(glue)} |")
        lines.append("")
    return lines
