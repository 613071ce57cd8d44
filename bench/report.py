"""`python -m bench.report`: rebuild bench/RESULTS.md from the latest result file per model shape."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.report_adapters import adapters_section
from bench.report_kernels import kernel_section
from bench.report_serving import serving_section
from bench.results import RATIOS, fmt

BENCH_MODELS = ("1b", "8b")
RAW_FIELDS = (
    ("tokens/s", "tokens_per_s"),
    ("decode step ms (median)", "decode_step_ms_median"),
    ("mean context", "mean_context"),
    ("batch", "batch"),
    ("new tokens", "new_tokens"),  # ours: max_tokens
)


def load_runs(results_dir: Path) -> dict[str, list[tuple[str, dict]]]:
    """model -> [(file name, data)] of every result for that benchmark model, newest first: full runs
    before --quick smoke runs, then H200 runs before other cards' (the issues' targets are the H200's, and a
    roofline fraction is over the card's own copy bandwidth: 8B merged batch-32 steps of 4.19 and 4.34 ms read 0.31 of
    an H200's 4.2 TB/s and 0.42 of an H100's 3.0), then by timestamp, then by file name. Another card's run
    stands for a ratio only where no H200 run measured it."""
    runs: dict[str, list[tuple[tuple[bool, bool, str, str], str, dict]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        model = data.get("model")
        if model not in BENCH_MODELS or data.get("benchmark"):  # another benchmark's file (serve, engine_loop)
            continue
        order = (not data.get("quick"), "H200" in str(data.get("device", "")),
                 str(data.get("timestamp") or data.get("date") or ""), path.name)
        runs.setdefault(model, []).append((order, path.name, data))
    return {model: [(name, data) for _, name, data in sorted(found, key=lambda r: r[0], reverse=True)]
            for model, found in runs.items()}


def load_latest(results_dir: Path) -> dict[str, tuple[str, dict]]:
    """model -> (file name, data) of the result per benchmark model whose raw figures the report shows."""
    return latest_runs(load_runs(results_dir))


def latest_runs(runs: dict[str, list[tuple[str, dict]]]) -> dict[str, tuple[str, dict]]:
    """The first of each model's runs (load_runs' order) whose raw figures stand for the defaults: an A/B of a
    non-default setting, or a run whose time budget skipped some of its configs, only where no other run is left
    (the fifty-first session's H200 call ran out of device time in both engine runs, and its A/B's figures had
    taken the raw table's place)."""
    def rank(run: tuple[str, dict]) -> tuple[bool, bool]:
        data = run[1]
        skipped = any(isinstance(value, dict) and "skipped" in value for value in (data.get("ours") or {}).values())
        return bool(data.get("ab")), skipped

    return {model: min(found, key=rank) for model, found in runs.items()}


def ratio_table(runs: dict[str, list[tuple[str, dict]]]) -> list[str]:
    """Each ratio from the newest run that measured it (every ratio comes from one run; the source
    column names it, so a ratio an older run measured says so)."""
    lines = ["| ratio | what | target | measured | met | source |", "|---|---|---|---|---|---|"]
    for ratio in RATIOS:
        source, value = "—", None
        for name, data in runs.get(ratio.model, []):
            if data.get("ab"):  # an A/B of a non-default setting never stands for a target
                continue
            value = (data.get("ratios") or {}).get(ratio.key)
            if value is not None:
                source = name
                break
        met = ratio.is_met(value)
        met_text = "—" if met is None else ("yes" if met else "**no**")
        lines.append(f"| `{ratio.key}` | {ratio.description} | {ratio.target_text} | {fmt(value)} | {met_text} | "
                     f"{source if source == '—' else f'`results/{source}`'} |")
    return lines


def raw_table(name: str, data: dict) -> list[str]:
    lines = [f"### {data.get('model')} shape — `results/{name}`", "",
             f"{data.get('device')}, {data.get('date')}, torch {_version(data, 'torch')}, transformers "
             f"{_version(data, 'transformers')}, peft {_version(data, 'peft')}, bitsandbytes "
             f"{_version(data, 'bitsandbytes')}{', quick run' if data.get('quick') else ''}; "
             f"command `{data.get('command', 'python -m bench')}`.", ""]
    header = "| side | config | " + " | ".join(title for title, _ in RAW_FIELDS) + " | note |"
    lines += [header, "|" + "---|" * (len(RAW_FIELDS) + 3)]
    for side in ("ours", "baseline"):
        for config, value in (data.get(side) or {}).items():
            if not _is_row(value):
                continue
            value = {"new_tokens": value.get("max_tokens"), **value}
            cells = " | ".join(fmt(value.get(key)) for _, key in RAW_FIELDS)
            lines.append(f"| {side} | {config} | {cells} | {_note(value)} |")
    lines.append("")
    lines += _extras(data)
    return lines


def _is_row(value: Any) -> bool:
    """A measurement worth a row: it has a figure of RAW_FIELDS, or an error, a skip, a swap or merge."""
    return isinstance(value, dict) and bool({key for _, key in RAW_FIELDS} & value.keys() or _note(value))


def _note(value: dict) -> str:
    if "error" in value:
        return "error: " + str(value["error"]).splitlines()[0][:160].replace("|", "/")
    if "skipped" in value:
        return str(value["skipped"])
    if "merge_s" in value:
        return f"PEFT merge {fmt(value['merge_s'])} s, unmerge {fmt(value.get('unmerge_s'))} s"
    if "swap_ms_median" in value:
        return f"swap median {fmt(value['swap_ms_median'])} ms, bit exact {fmt(value.get('bit_exact'))}"
    return ""


def _extras(data: dict) -> list[str]:
    lines = []
    bandwidth = data.get("bandwidth") or {}
    if "gbps_best" in bandwidth:
        lines.append(f"- device-to-device copy bandwidth: {fmt(bandwidth['gbps_best'])} GB/s best, "
                     f"{fmt(bandwidth.get('gbps_median'))} GB/s median (read + write of a "
                     f"{bandwidth.get('copy_bytes', 0) / 2**30:.0f} GiB copy)")
    for name, roof in (data.get("roofline") or {}).items():
        if roof:
            lines.append(f"- roofline {name}: {fmt(roof['bytes']['total'] / 1e9)} GB per step at context "
                         f"{fmt(roof['mean_context'])} -> {fmt(roof['roofline_step_ms'])} ms; measured "
                         f"{fmt(roof['measured_step_ms'])} ms (fraction {fmt(roof['fraction'])})")
    return lines + ([""] if lines else [])


def _version(data: dict, name: str) -> str:
    return str((data.get("versions") or {}).get(name, "?"))


def build_report(results_dir: Path) -> str:
    runs = load_runs(results_dir)
    latest = latest_runs(runs)
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench.report` from `bench/results/*.json`; each file comes from one "
             "`python -m bench --model 1b|8b` run on one GPU, loraplex and the HF transformers + PEFT baseline "
             "measured side by side on the same random NF4 weights. Each ratio is taken from the newest H200 run that "
             "measured it, another card's only where no H200 run did (the source column names the file); raw figures "
             "are those of the newest such run per shape. "
             "Targets are those of issue 6.", ""]
    if not latest:
        lines += ["**No GPU run yet.** Run `python -m bench --model 1b` and `python -m bench --model 8b` on the "
                  "GPU machine, commit `bench/results/`, then `python -m bench.report`.", ""]
    lines += ["## Ratios", ""] + ratio_table(runs) + [""]
    lines += ["Definitions: tokens/s = generated tokens / wall time from submission to the last token, prefill "
              "included, after a warm-up run of the same shape. Decode step time = median of engine steps that "
              "only decode with the whole batch running. Swap = `MergedSwapper.swap` from one adapter to "
              "another (median); PEFT's equivalent is `merge_adapter` + `unmerge_adapter`. Roofline = bytes a "
              "decode step must read (NF4 linears at 0.52 byte/param, 16-bit LM head, KV cache at the "
              "measured mean context, adapter slots) / measured copy bandwidth.", ""]
    lines += kernel_section(results_dir, runs)
    lines += serving_section(results_dir)
    lines += adapters_section(results_dir)
    notes = results_dir.parent / "NOTES.md"
    if notes.is_file():  # hand-written analysis that the generated tables cannot carry
        lines += [notes.read_text().rstrip(), ""]
    if latest:
        lines += ["## Raw figures", ""]
        for model in BENCH_MODELS:
            if model in latest:
                lines += raw_table(*latest[model])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    args = parser.parse_args(argv)
    text = build_report(args.results)
    args.out.write_text(text)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
