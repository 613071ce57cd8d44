"""The LORAPLEX_* environment variables read outside Settings: the kernels' and the engine's debugging and A/B
switches (README, "Development") and the test and benchmark harnesses' own. Every other LORAPLEX_* variable must be
a Settings field: `unknown_variables` names the rest, which parse_settings refuses, so that a misspelt setting
(LORAPLEX_MAX_SLOT) stops the start instead of being silently ignored."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

PREFIX = "LORAPLEX_"

SWITCHES = frozenset({
    # kernels and engine (README's debugging switches; the modules that read them say what each does)
    "LORAPLEX_CHECK_STEP_INPUTS", "LORAPLEX_DECODE_FRESH_KV", "LORAPLEX_DECODE_TUNING", "LORAPLEX_DEFER_MIN_ROWS",
    "LORAPLEX_DEFER_SPLIT_SUMS", "LORAPLEX_FILL_KERNEL", "LORAPLEX_FUSED_DECODE_ROTARY",
    "LORAPLEX_GLUE_COMPILED_SPLITS", "LORAPLEX_LORA_FUSED_ACT", "LORAPLEX_LORA_FUSED_SUMS", "LORAPLEX_LORA_KERNEL",
    "LORAPLEX_LORA_ONE_FILL", "LORAPLEX_LORA_ONE_ROW", "LORAPLEX_LORA_SHRINK_TUNING", "LORAPLEX_LORA_SIDE_EXPAND",
    "LORAPLEX_LORA_SIDE_STREAM", "LORAPLEX_LORA_SILU_SHRINK", "LORAPLEX_LORA_TILE", "LORAPLEX_LORA_TILE_SHRINK",
    "LORAPLEX_NF4_AUTOTUNE", "LORAPLEX_NF4_BULK_X", "LORAPLEX_NF4_BULK_X_64", "LORAPLEX_NF4_CLUSTER_SUM",
    "LORAPLEX_NF4_GEMM_ROWS", "LORAPLEX_NF4_GEMV_ROWS", "LORAPLEX_NF4_KERNEL", "LORAPLEX_NF4_ONE_WAIT",
    "LORAPLEX_NF4_PAIRS", "LORAPLEX_NF4_TUNE_FEW_ROWS", "LORAPLEX_NF4_TUNING_CACHE", "LORAPLEX_NF4_WGMMA_ROWS",
    "LORAPLEX_NORM_SPLIT_SUMS", "LORAPLEX_NORM_SUMS_MIN_ROWS", "LORAPLEX_PDL", "LORAPLEX_PDL_LORA",
    "LORAPLEX_SLOT_SCATTER", "LORAPLEX_TOP_P_CUDA", "LORAPLEX_TOP_P_KERNEL",
    # diagnostics (server.profiling, server.engine.step_trace, server.hop_trace)
    "LORAPLEX_PROFILE_DIR", "LORAPLEX_STEP_TRACE", "LORAPLEX_HOP_TRACE",
    # the test and benchmark harnesses (tests/, bench/)
    "LORAPLEX_TRITON_INTERPRET", "LORAPLEX_TRITON_COMPILE", "LORAPLEX_CHAOS_SUMMARY", "LORAPLEX_IMAGE_TEST",
    "LORAPLEX_BENCH_FAKE_STEP_MS", "LORAPLEX_BENCH_FAKE_PREFILL_US",
})


def unknown_variables(environ: Mapping[str, str], setting_names: Iterable[str]) -> list[str]:
    """The LORAPLEX_* variables of `environ` that are neither a setting (by field name) nor a switch, each with
    the closest known name where one is close ("LORAPLEX_MAX_SLOT (did you mean LORAPLEX_MAX_SLOTS?)")."""
    known = {PREFIX + name.upper() for name in setting_names} | SWITCHES
    problems = []
    for variable in sorted(environ):
        name = variable.upper()  # pydantic-settings reads the variables case-insensitively
        if not name.startswith(PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        problems.append(f"{variable} (did you mean {close[0]}?)" if close else variable)
    return problems
