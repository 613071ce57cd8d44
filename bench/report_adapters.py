"""The adapters-at-scale part of bench/RESULTS.md (issue 15): every committed `python -m bench.serve` run of
the `zipf1000`, `cold-warm` and `fairness` presets, one row each, newest first."""

from __future__ import annotations

from pathlib import Path

from bench.report_serving import newest_first
from bench.results import fmt


def _row(name: str, *values) -> str:
    return f"| `{name}` | " + " | ".join(fmt(v) for v in values) + " |"


def _zipf1000(results_dir: Path) -> list[str]:
    runs = newest_first(results_dir.glob("*-serve-zipf1000-*.json"))
    if not runs:
        return []
    lines = ["1,000 adapters (`python -m bench.serve --model 1b --preset zipf1000`: ranks 8/16/32/64, all seven "
             "linears; uniform traffic over 32 of them, then Zipf(1.0) over all; target Zipf / uniform >= 0.90). "
             "Loads: adapters read from disk (cpu) and copied into the GPU pool (gpu) during the measured load.", "",
             "| run | uniform32 tok/s | ITL p50 ms | zipf1000 tok/s | ITL p50 ms | TTFT p99 ms | cpu loads | gpu loads "
             "| gpu evictions | zipf / uniform |", "|---|" + "---|" * 9]
    for name, data in runs:
        server = data.get("server", {})
        uniform, zipf = server.get("serve/uniform32", {}), server.get("serve/zipf1000", {})
        tiers = zipf.get("server_metrics") or {}
        lines.append(_row(name, uniform.get("tokens_per_s"), uniform.get("itl_ms_p50"), zipf.get("tokens_per_s"),
                          zipf.get("itl_ms_p50"), zipf.get("ttft_ms_p99"), tiers.get("cpu_loads"),
                          tiers.get("slot_loads"), tiers.get("gpu_evictions"),
                          (data.get("ratios") or {}).get("zipf1000_over_uniform32")))
    return lines + [""]


def _cold_warm(results_dir: Path) -> list[str]:
    runs = newest_first(results_dir.glob("*-serve-cold-warm-*.json"))
    if not runs:
        return []
    lines = ["Cold and warm adapters (`python -m bench.serve --model 8b --preset cold-warm`: rank 16, 84 MB; cold = on "
             "disk only after a restart; targets cold - warm TTFT p50 <= 60 ms, upload to first token p50 <= 300 ms):",
             "", "| run | upload p50 ms | upload to first token p50 ms | cold TTFT p50 ms | warm TTFT p50 ms | "
             "cold - warm ms |", "|---|---|---|---|---|---|"]
    for name, data in runs:
        server, ratios = data.get("server", {}), data.get("ratios") or {}
        usable = server.get("serve/upload_to_usable", {})
        extra = next((v for k, v in ratios.items() if k.startswith("cold_ttft_extra")), None)
        lines.append(_row(name, usable.get("upload_ms_p50"), usable.get("upload_to_first_token_ms_p50"),
                          server.get("serve/cold", {}).get("ttft_ms_p50"),
                          server.get("serve/warm", {}).get("ttft_ms_p50"), extra))
    return lines + [""]


def _fairness(results_dir: Path) -> list[str]:
    runs = newest_first(results_dir.glob("*-serve-fairness-*.json"))
    if not runs:
        return []
    lines = ["Two tenants (`python -m bench.serve --model 1b --preset fairness`: a light tenant of 2 streams alone, "
             "then beside a heavy one of 20; target light p99 TTFT beside / alone <= 2.0):", "",
             "| run | alone TTFT p50 ms | alone p99 ms | beside TTFT p50 ms | beside p99 ms | p99 ratio |",
             "|---|---|---|---|---|---|"]
    for name, data in runs:
        server = data.get("server", {})
        alone, beside = server.get("serve/light_alone", {}), server.get("serve/light_with_heavy", {})
        lines.append(_row(name, alone.get("ttft_ms_p50"), alone.get("ttft_ms_p99"), beside.get("ttft_ms_p50"),
                          beside.get("ttft_ms_p99"), (data.get("ratios") or {}).get("fair_light_p99_ratio")))
    return lines + [""]


def adapters_section(results_dir: Path) -> list[str]:
    body = _zipf1000(results_dir) + _cold_warm(results_dir) + _fairness(results_dir)
    return ["## Adapters at scale (issue 15)", ""] + (body or ["No run of these presets committed yet.", ""])
