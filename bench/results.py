"""The result file: incremental JSON writes, derived rooflines and the eight ratios with targets.

Pure Python (no torch), so `bench.report` and its CPU test can use it.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.roofline import roofline


@dataclass(frozen=True)
class Ratio:
    """One headline ratio, the model shape it is measured on, and its target from issue 6."""

    key: str
    model: str
    description: str
    op: str  # ">=", "<=" or "=="
    target: float | bool

    def is_met(self, value: Any) -> bool | None:
        if value is None:
            return None
        if self.op == "==":
            return value == self.target
        if self.op == ">=":
            return value >= self.target
        return value <= self.target

    @property
    def target_text(self) -> str:
        if isinstance(self.target, bool):
            return str(self.target).lower()
        return f"{self.op} {self.target:g}"


RATIOS = (
    Ratio("mixed32_over_merged_8b", "8b", "32 distinct unmerged adapters / one merged adapter, tokens/s, batch 32",
          ">=", 0.80),
    Ratio("vs_peft_mixed32_1b", "1b", "loraplex / HF+PEFT tokens/s, 32 distinct adapters, batch 32", ">=", 100),
    Ratio("roofline_fraction_merged_b32_8b", "8b", "merged batch-32 decode step: roofline time / measured time",
          ">=", 0.40),
    Ratio("vs_hf_b1_8b", "8b", "loraplex / HF generate tokens/s, batch 1, no adapter, NF4", ">=", 5),
    Ratio("swap_ms_8b", "8b", "merged swap time in ms (all-linear rank 16), median", "<=", 250),
    Ratio("swap_speedup_vs_peft_8b", "8b", "PEFT merge+unmerge time / our merged swap time", ">=", 20),
    Ratio("swap_bit_exact", "8b", "NF4 codes and absmax restored bit for bit after swaps", "==", True),
    Ratio("ctx128_over_ctx2048_8b", "8b", "decode step time at context 128 / at 2048, batch 32", "<=", 0.6),
)
RATIO_KEYS = tuple(r.key for r in RATIOS)
# Also in an 8B file's ratios: issue 14's batch-1 figure (its target row is in bench.report_kernels' table)
ENGINE_KEYS = ("b1_tokens_per_s_8b",)


def fmt(value: Any) -> str:
    """A figure as the reports print it: 3 significant digits, thousands separated, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _get(data: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _div(num: Any, den: Any) -> float | None:
    if not isinstance(num, int | float) or not isinstance(den, int | float) or den == 0:
        return None
    return num / den


def derive(data: dict) -> None:
    """Fill `roofline` and `ratios` from the raw figures present so far (missing inputs give null)."""
    shape = _get(data, "config", "shape")
    bandwidth = _get(data, "bandwidth", "gbps_best")
    ours, base = data.get("ours", {}), data.get("baseline", {})
    if shape:
        data["roofline"] = {
            name: roofline(shape, ours.get(name), bandwidth, num_adapters)
            for name, num_adapters in (("merged1_b32", 0), ("base_b1", 0), ("base_b32", 0), ("mixed32_b32", 32))
        }
    model = data.get("model")
    ratios: dict[str, Any] = dict.fromkeys(RATIO_KEYS)
    if model == "1b":
        ratios["vs_peft_mixed32_1b"] = _div(_get(ours, "mixed32_b32", "tokens_per_s"),
                                            _get(base, "peft_mixed32_b32", "tokens_per_s"))
    if model == "8b":
        swap_ms = _get(ours, "swap", "swap_ms_median")
        peft_s = _get(base, "peft_merged_b32", "merge_unmerge_s")
        ratios.update({
            "b1_tokens_per_s_8b": _get(ours, "base_b1", "tokens_per_s"),
            "mixed32_over_merged_8b": _div(_get(ours, "mixed32_b32", "tokens_per_s"),
                                           _get(ours, "merged1_b32", "tokens_per_s")),
            "roofline_fraction_merged_b32_8b": _get(data, "roofline", "merged1_b32", "fraction"),
            "vs_hf_b1_8b": _div(_get(ours, "base_b1", "tokens_per_s"), _get(base, "hf_b1", "tokens_per_s")),
            "swap_ms_8b": swap_ms,
            "swap_speedup_vs_peft_8b": _div(peft_s * 1e3 if peft_s is not None else None, swap_ms),
            "swap_bit_exact": _get(ours, "swap", "bit_exact"),
            "ctx128_over_ctx2048_8b": _div(_get(ours, "ctx128_b32", "decode_step_ms_median"),
                                           _get(ours, "ctx2048_b32", "decode_step_ms_median")),
        })
    data["ratios"] = ratios


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# LORAPLEX_ variables that change nothing a benchmark measures: the CPU test harness's and auth's. Every other one
# (a kernel or launch switch, a server setting, a trace) makes the run an A/B.
NEUTRAL_SETTINGS = frozenset({"LORAPLEX_TRITON_INTERPRET", "LORAPLEX_TRITON_COMPILE", "LORAPLEX_IMAGE_TEST",
                              "LORAPLEX_CHAOS_SUMMARY", "LORAPLEX_CACHE_DIR", "LORAPLEX_AUTH_FILE",
                              "LORAPLEX_METRICS_REQUIRE_KEY", "LORAPLEX_METRICS_KEY_SHA256"})


def ab_settings(environ=os.environ) -> str | None:
    """'NAME=value ...' of the LORAPLEX_ variables set for this run that are not NEUTRAL_SETTINGS (the server a
    benchmark starts inherits them), or None. A result carrying them as `"ab"` never stands for a target in
    bench.report; the GPU scripts' ENGINE_AB / PROFILE_AB runs used to be marked by hand."""
    found = sorted(f"{name}={value}" for name, value in environ.items()
                   if name.startswith("LORAPLEX_") and name not in NEUTRAL_SETTINGS)
    return " ".join(found) or None


class Recorder:
    """Holds the result dict and rewrites the JSON file after every measurement (atomic replace),
    so a run cut short still leaves every figure it got. A run with non-neutral LORAPLEX_ variables is marked
    `"ab"` (ab_settings)."""

    def __init__(self, path: Path, data: dict, budget_s: float):
        self.path = path
        self.data = data
        if ab := ab_settings():
            data.setdefault("ab", ab)
        self.start = time.perf_counter()
        self.budget_s = budget_s
        for section in ("ours", "baseline", "build"):
            data.setdefault(section, {})
        data.setdefault("errors", {})
        self.save()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed:7.1f}s] {message}", flush=True)

    def measure(self, section: str | None, name: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        """Run one measurement; store its result (at data[section][name], or data[name] when section is
        None), or the error string, and save. Skips it when less than `needs_s` of the budget is left."""
        label = name if section is None else f"{section}.{name}"
        left = self.budget_s - self.elapsed
        if left < needs_s:
            value: Any = {"skipped": f"time budget: {left:.0f} s left, needs about {needs_s:.0f} s"}
            self.log(f"{label}: skipped ({value['skipped']})")
        else:
            self.log(f"{label} ...")
            start = time.perf_counter()
            try:
                value = fn()
            except Exception as err:  # record and go on: one failure must not lose the other figures
                traceback.print_exc()
                value = {"error": f"{type(err).__name__}: {err}"[:2000]}
                self.data["errors"][label] = value["error"]
            took = time.perf_counter() - start
            if isinstance(value, dict):
                value.setdefault("measure_s", round(took, 2))
            self.log(f"{label}: {summary(value)} ({took:.1f} s)")
        if section is None:
            self.data[name] = value
        else:
            self.data[section][name] = value
        self.save()
        return value

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed, 1)
        derive(self.data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def summary(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    if "error" in value:
        return "ERROR " + value["error"].splitlines()[0][:300]
    picks = ("tokens_per_s", "decode_step_ms_median", "swap_ms_median", "bit_exact", "merge_unmerge_s",
             "gbps_best", "mean_context")
    shown = {k: value[k] for k in picks if k in value}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "ok"


def write_named_result(out_dir: str | Path, result: dict, suffix: str) -> Path:
    """Write `result` (with "date" and "device") to <out_dir>/<date>-<device slug>-<suffix>.json and print
    its ratios; for the one-shot GPU scripts (bench.kernels, bench.prefill, bench.profile_step)."""
    result.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))  # orders same-date runs
    if ab := ab_settings():
        result.setdefault("ab", ab)
    slug = str(result["device"]).lower().replace(" ", "-")
    path = Path(out_dir) / f"{result['date']}-{slug}-{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("ratios")), "->", path, flush=True)
    return path
