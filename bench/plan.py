"""What one run measures and with how many tokens, per model shape and mode (full or --quick)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF/PEFT new tokens per config. The mixed-batch PEFT path loops over adapters in Python on every
# linear (about 1 s a step at batch 32 for the 1B shape), so it gets few tokens; for the 8B shape
# every baseline config is cut so that it finishes in well under 60 s.
BASELINE_TOKENS = {
    ("1b", False): {"hf_b1": 128, "hf_b32": 128, "peft_merged_b32": 128, "peft_unmerged1_b32": 128,
                    "peft_mixed8_b32": 16, "peft_mixed32_b32": 16},
    ("8b", False): {"hf_b1": 64, "hf_b32": 64, "peft_merged_b32": 32, "peft_unmerged1_b32": 32,
                    "peft_mixed8_b32": 8, "peft_mixed32_b32": 8},
    ("1b", True): {"hf_b1": 16, "hf_b32": 16, "peft_merged_b32": 16, "peft_unmerged1_b32": 16,
                   "peft_mixed8_b32": 4, "peft_mixed32_b32": 4},
    ("8b", True): {"hf_b1": 8, "hf_b32": 8, "peft_merged_b32": 8, "peft_unmerged1_b32": 8,
                   "peft_mixed8_b32": 2, "peft_mixed32_b32": 2},
}
BASELINE_TOKENS[("tiny", False)] = BASELINE_TOKENS[("tiny", True)] = BASELINE_TOKENS[("1b", True)]

# Seconds of budget a measurement needs before it is started (rough upper estimates). Ours on the H200 (twelfth
# session): each 8B row 0.9-2.5 s with its warm-up run, the context rows 0.3-2.3 s; at 30 / 40 two runs skipped
# mixed32_b32, the context rows and both merged rows with 25-29 s of budget left.
NEEDS_S = {
    "1b": {"ours": 8, "ctx": 10, "hf": 20, "peft_merged_b32": 40, "peft_mixed": 40},
    "8b": {"ours": 10, "ctx": 15, "hf": 30, "peft_merged_b32": 100, "peft_mixed": 60},
    "tiny": {"ours": 0, "ctx": 0, "hf": 0, "peft_merged_b32": 0, "peft_mixed": 0},
}
DEFAULT_BUDGET_S = {"1b": 360.0, "8b": 480.0, "tiny": 1800.0}


@dataclass
class Plan:
    model: str
    quick: bool
    prompt_len: int = 128
    max_tokens: int = 128  # ours: new tokens per request
    ctx_lens: tuple[int, int] = (128, 2048)
    ctx_max_tokens: int = 48
    num_swaps: int = 6
    num_adapters: int = 32
    bandwidth_bytes: int = 2 << 30
    bandwidth_iters: int = 10
    budget_s: float = 480.0
    baseline_tokens: dict[str, int] = field(default_factory=dict)
    needs_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def make(cls, model: str, quick: bool, budget_s: float | None) -> Plan:
        plan = cls(model=model, quick=quick, baseline_tokens=dict(BASELINE_TOKENS[(model, quick)]),
                   needs_s=dict(NEEDS_S[model]), budget_s=budget_s or DEFAULT_BUDGET_S[model])
        if quick:
            plan.max_tokens, plan.ctx_max_tokens, plan.num_swaps, plan.bandwidth_iters = 16, 24, 3, 3
        if model == "tiny":
            plan.ctx_lens, plan.bandwidth_bytes, plan.max_tokens = (128, 512), 64 << 20, 16
        return plan

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def versions() -> dict[str, Any]:
    """Library versions and the code revision that produced a result."""
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "matplotlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            try:
                found[name] = getattr(importlib.import_module(name), "__version__", "unknown")
            except ImportError:
                found[name] = None
    try:
        import torch

        found["cuda"] = torch.version.cuda
    except ImportError:
        found["cuda"] = None
    # The engine's LORAPLEX_* switches (an A/B run's set), so that a result file says which variant it timed
    found["env"] = {name: value for name, value in sorted(os.environ.items()) if name.startswith("LORAPLEX_")}
    found["git_commit"] = _git("rev-parse", "HEAD")
    found["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return found


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
