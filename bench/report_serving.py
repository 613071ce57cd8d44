"""The serving part of bench/RESULTS.md (issue 13): every `python -m bench.serve` run and step profile
committed under bench/results (c32, prefix, lora-modes) and every `python -m bench.engine_loop` run, one
row each, newest first."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report_kernels import newest_with_ratios, target_row
from bench.results import Ratio, fmt

SERVE_FIELDS = ("tokens_per_s", "ttft_ms_p50", "itl_ms_p50")


# Issue 13's targets, each with the results files that measure it.
SERVING_TARGETS = (
    (Ratio("serve_over_engine_1b_c32", "1b", "server tok/s / engine tok/s, 32 adapters, 32 streams", ">=", 0.90),
     "*-serve-c32-*.json"),
    (Ratio("sampled_over_greedy_1b_c32", "1b", "server tok/s, temperature 1.0 top-p 0.9 / greedy", ">=", 0.95),
     "*-serve-c32-*.json"),
    (Ratio("itl_p50_over_step_1b_c32", "1b", "server ITL p50 / engine decode step", "<=", 1.1), "*-serve-c32-*.json"),
    (Ratio("auto_over_best_zipf_1b", "1b", "auto / the better of merged and unmerged, Zipf(1.0) over 32", ">=", 1.0),
     "*-serve-lora-modes-*.json"),
    (Ratio("auto_over_best_uniform_1b", "1b", "same, uniform over 32 adapters", ">=", 0.97),
     "*-serve-lora-modes-*.json"),
    (Ratio("auto_over_best_single_1b", "1b", "same, one adapter", ">=", 0.97), "*-serve-lora-modes-*.json"),
    (Ratio("decode_step_ms_b32_1b", "1b", "merged batch-32 decode step, GPU ms", "<=", 1.5), "*-1b-b32-*profile*.json"),
    (Ratio("glue_fraction_b32_1b", "1b", "non-matmul kernels / the step's GPU time, same step", "<=", 0.10),
     "*-1b-b32-*profile*.json"),
    (Ratio("roofline_fraction_merged_b32_8b", "8b", "merged batch-32 decode step: roofline time / measured time",
           ">=", 0.40), "*-8b*.json"),
)


def serving_targets(results_dir: Path) -> list[str]:
    """Issue 13's targets, each from the newest committed H200 run that measured it (the issue's targets are the
    H200's; a roofline fraction is over the card's own bandwidth, so an H100's 0.42 is not the H200's 0.31 for
    the same kernels), another GPU's only where no H200 run did."""
    lines = ["| ratio | what | target | measured | met | source |", "|---|---|---|---|---|---|"]
    for ratio, pattern in SERVING_TARGETS:
        newest = (newest_with_ratios(results_dir, pattern.replace("*-", "*-nvidia-h200-", 1), ratio.key)
                  or newest_with_ratios(results_dir, pattern, ratio.key, gpu_only=True))
        source, value = (newest[0], newest[1]["ratios"][ratio.key]) if newest else (None, None)
        lines.append(target_row(ratio, value, source))
    return lines + [""]


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


def newest_first(paths) -> list[tuple[str, dict]]:
    """(file name, data) by the run's own timestamp, newest first (file names do not sort by time)."""
    runs = [(p.name, json.loads(p.read_text())) for p in paths]
    return sorted(runs, key=lambda run: (str(run[1].get("timestamp") or run[1].get("date") or ""), run[0]),
                  reverse=True)


def _prefix_and_modes(results_dir: Path) -> list[str]:
    """Issue 10's cached-prefix TTFT ratio and issue 13's auto-mode ratios, one row per run."""
    lines = []
    prefix = newest_first(results_dir.glob("*-serve-prefix-*.json"))
    if prefix:
        lines += ["Cached-prefix time to first token (`python -m bench.serve --model 8b --preset prefix`: prompts of "
                  "2,048 + 16 tokens sent one at a time, the prefix new (miss) or cached (hit); target hit / miss "
                  "<= 0.2):", "", "| run | miss TTFT p50 ms | hit TTFT p50 ms | server hit TTFT ms | hit / miss |",
                  "|---|---|---|---|---|"]
        for name, data in prefix:
            server = data.get("server", {})
            miss, hit = server.get("serve/prefix_miss", {}), server.get("serve/prefix_hit", {})
            ratio = next(iter((data.get("ratios") or {}).values()), None)
            lines.append(f"| `{name}` | {fmt(miss.get('ttft_ms_p50'))} | {fmt(hit.get('ttft_ms_p50'))} | "
                         f"{fmt((hit.get('server_metrics') or {}).get('ttft_ms_mean'))} | {fmt(ratio)} |")
        lines.append("")
    modes = newest_first(results_dir.glob("*-serve-lora-modes-*.json"))
    if modes:
        lines += ["LoRA modes (`python -m bench.serve --model 1b --preset lora-modes`, output tok/s; targets "
                  "auto / best >= 1.0 Zipf, >= 0.97 uniform and single):", "",
                  "| run | traffic | unmerged | merged | auto | auto / best |", "|---|---|---|---|---|---|"]
        for name, data in modes:
            server, ratios = data.get("server", {}), data.get("ratios") or {}
            for traffic in ("zipf", "uniform", "single"):
                cells = [fmt(server.get(f"{mode}/{traffic}", {}).get("tokens_per_s"))
                         for mode in ("unmerged", "merged", "auto")]
                ratio = next((v for k, v in ratios.items() if k.startswith(f"auto_over_best_{traffic}")), None)
                lines.append(f"| `{name}` | {traffic} | " + " | ".join(cells) + f" | {fmt(ratio)} |")
        lines.append("")
    loops = newest_first(results_dir.glob("*-loop*.json"))
    if loops:
        lines += ["The engine alone under the arrivals of 32 streams (`python -m bench.engine_loop --model 1b --prefix "
                  "2048`; closed loop: each finished request replaced at once) against the same batch in lockstep, "
                  "and the engine-level cached-prefix TTFT. The lockstep figure of these runs includes a first "
                  "step that compiled kernels (1-1.8 s): the fair engine reference is bench.serve's.", "",
                  "| run | lockstep tok/s | closed loop tok/s | decode-only step ms | prefill steps | "
                  "prefix miss ms | prefix hit ms |", "|---|---|---|---|---|---|---|"]
        for name, data in loops:
            kinds = data.get("closed_loop", {}).get("by_kind", {})
            prefill = sum(kind.get("count", 0) for key, kind in kinds.items() if key != "decode_only")
            prefix = data.get("prefix", {})
            lines.append(f"| `{name}` | {fmt(data.get('lockstep', {}).get('tokens_per_s'))} | "
                         f"{fmt(data.get('closed_loop', {}).get('tokens_per_s'))} | "
                         f"{fmt(kinds.get('decode_only', {}).get('ms_median'))} | {prefill} | "
                         f"{fmt(prefix.get('miss_ms_median'))} | {fmt(prefix.get('hit_ms_median'))} |")
        lines.append("")
    return lines


def serving_section(results_dir: Path) -> list[str]:
    serves = [p for p in results_dir.glob("*-serve-c32-*.json")]
    profiles = sorted(results_dir.glob("*-profile*.json"), key=lambda p: p.name, reverse=True)
    samplers = [p for p in profiles if "-sampler-profile" in p.name]
    profiles = [p for p in profiles if p not in samplers]
    prefills = [p for p in profiles if json.loads(p.read_text()).get("step") == "prefill"]
    profiles = [p for p in profiles if p not in prefills]
    lines = ["## Serving (issue 13)", ""]
    if not serves and not profiles and not samplers:
        return lines + ["No `python -m bench.serve` run committed yet.", ""]
    lines += serving_targets(results_dir)
    lines += ["`python -m bench.serve --model 1b --preset c32` (32 rank-16 adapters over HTTP, 32 streams, prompt "
              "128, output 64; the file name's tag says the server flags: `proc` = `--engine-process`, `gil` = "
              "`--gil-switch-interval-ms 0.5`). Targets: serve/engine >= 0.90, ITL p50 / engine step <= 1.1, "
              "sampled / greedy >= 0.95. A dash: the load was skipped for time.", "",
              "| run | greedy tok/s | TTFT p50 ms | ITL p50 ms | sampled tok/s | TTFT p50 ms | ITL p50 ms | "
              "engine step ms | serve / engine | ITL / step |", "|---|" + "---|" * 9]
    lines += [_serve_row(name, data) for name, data in newest_first(serves)]
    lines.append("")
    lines += _prefix_and_modes(results_dir)
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
    if prefills:
        lines += _prefill_profiles(prefills)
    if samplers:
        lines += _sampler_profiles(samplers)
    return lines


def _sampler_profiles(paths: list[Path]) -> list[str]:
    """`bench.sampler_profile`: the device time of one sampler call by kind of draw, and the host time of its launches
    (flat rows: a random-weight model's logits; peaked: randn x 4)."""
    configs = [(shape, kind) for shape in ("flat", "peaked") for kind in ("greedy", "temperature", "top_p")]
    lines = ["The sampler alone on logits [32, 128256] (`python -m bench.sampler_profile`; device us / host launch us "
             "of one call):", "",
             "| run | " + " | ".join(f"{shape} {kind}" for shape, kind in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for path in paths:
        results = json.loads(path.read_text()).get("results", {})
        cells = [f"{fmt(results[f'{shape}/{kind}']['device_us'])} / {fmt(results[f'{shape}/{kind}']['host_launch_us'])}"
                 if f"{shape}/{kind}" in results else "—" for shape, kind in configs]
        lines.append(f"| `{path.name}` | " + " | ".join(cells) + " |")
    return lines + [""]


def _prefill_profiles(paths: list[Path]) -> list[str]:
    """The step that prefills a whole batch (`bench.profile_step --prefill`): its host wall time against the GPU
    time of its kernels; a wall far above the kernels means the host's launches are the bound."""
    lines = ["The step that prefills a whole batch (`python -m bench.profile_step --model 8b --mode M --prefill`: "
             "32 prompts of 128 tokens; wall = host time of the step, synchronized, three rounds):", "",
             "| run | mode | wall ms | GPU ms | LoRA ms | NF4 ms | 16-bit matmul ms |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(path.read_text())
        kinds = data.get("ms_per_step", {})
        walls = " / ".join(fmt(w) for w in data.get("prefill_step_wall_ms", []))
        lines.append(f"| `{path.name}` | {data.get('mode')} | {walls} | {fmt(data.get('total_ms_per_step'))} | "
                     f"{fmt(kinds.get('lora'))} | {fmt(kinds.get('nf4_matmul'))} | {fmt(kinds.get('matmul_16bit'))} |")
    return lines + [""]
