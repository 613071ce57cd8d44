"""Tokens/s against distinct adapters in a batch of 32: loraplex vs HF+PEFT (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OURS_POINTS = (("unmerged1_b32", 1), ("mixed8_b32", 8), ("mixed32_b32", 32))
PEFT_POINTS = (("peft_unmerged1_b32", 1), ("peft_mixed8_b32", 8), ("peft_mixed32_b32", 32))


def _series(section: dict[str, Any], points) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for name, distinct in points:
        value = section.get(name)
        if isinstance(value, dict) and isinstance(value.get("tokens_per_s"), int | float):
            xs.append(distinct)
            ys.append(value["tokens_per_s"])
    return xs, ys


def make_plot(data: dict[str, Any], path: Path) -> str:
    """Write the plot to `path`; returns the path, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    ours, base = data.get("ours", {}), data.get("baseline", {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, section, points, style in (
        ("loraplex (unmerged, mixed batch)", ours, OURS_POINTS, "o-"),
        ("HF + PEFT (adapter_names)", base, PEFT_POINTS, "s--"),
    ):
        xs, ys = _series(section, points)
        if xs:
            ax.plot(xs, ys, style, label=label)
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for label, section, name, marker in (
        ("loraplex merged (1 adapter)", ours, "merged1_b32", "^"),
        ("HF + PEFT merged (1 adapter)", base, "peft_merged_b32", "v"),
    ):
        value = section.get(name)
        if isinstance(value, dict) and isinstance(value.get("tokens_per_s"), int | float):
            ax.plot([1], [value["tokens_per_s"]], marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 8, 32], labels=["1", "8", "32"])
    ax.set_xlabel("distinct adapters in the batch (batch 32)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{data.get('model', '?')} shape, {data.get('device', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
