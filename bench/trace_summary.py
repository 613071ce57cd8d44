"""Summarise an engine step trace (`LORAPLEX_STEP_TRACE=DIR`, one JSON line per step).

    python -m bench.trace_summary DIR/steps-<pid>.jsonl [--last-s 13.7] [--slow-ms 20]

Prints, for the steps of the window (the whole trace, or its last `--last-s` seconds: a measured load):
the wall time the steps took against the window's length; step times by kind (decode only, prefill
riding the decode graph, eager prefill) and graph bucket; what steps that started slot loads cost
against the same kind without; the slow steps; and each Triton kernel variant met, with the step that
followed it. This is what the sixth session read by hand from three runs' traces.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # cuda_graphs.DECODE_BUCKETS


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """(steps, compile events) of a trace file."""
    steps, compiles = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "compile" in record:
            compiles.append({**record, "step": len(steps)})  # the step it happened in: the next line's
        else:
            steps.append(record)
    return steps, compiles


def kind(step: dict) -> str:
    if step["fused"]:
        return "fused"
    return "eager_prefill" if step["prefill"] else "decode"


def bucket(step: dict) -> int:
    """The graph bucket of a replayed step; for an eager prefill, its prompt tokens to the next power of two."""
    if not step["fused"] and step["prefill"]:
        return 1 << max(0, step["prefill_tokens"] - 1).bit_length()
    rows = step["decode"] + (step["prefill_tokens"] if step["fused"] else 0)
    return next((b for b in BUCKETS if b >= rows), rows)


def summarize(steps: list[dict], compiles: list[dict], last_s: float | None = None,
              slow_ms: float = 20.0) -> dict:
    following = {id(c): steps[c["step"]]["ms"] if c.get("step", len(steps)) < len(steps) else None
                 for c in compiles}
    if last_s is not None and steps:
        start = steps[-1]["t"] - last_s
        steps = [s for s in steps if s["t"] >= start]
        compiles = [c for c in compiles if c["t"] >= start]
    by_kind: dict[tuple[str, int], list[float]] = defaultdict(list)
    loads: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for step in steps:
        by_kind[(kind(step), bucket(step))].append(step["ms"])
        loads[kind(step)][0 if step.get("slot_loads") else 1].append(step["ms"])
    span_ms = (steps[-1]["t"] - steps[0]["t"]) * 1e3 + steps[0]["ms"] if steps else 0.0
    return {
        "steps": len(steps),
        "step_ms_sum": round(sum(s["ms"] for s in steps), 1),
        "span_ms": round(span_ms, 1),
        "by_kind": {f"{k} {b}": _stats(v) for (k, b), v in sorted(by_kind.items())},
        "slot_load_steps": {k: {"with": _stats(w), "without": _stats(wo)} for k, (w, wo) in sorted(loads.items())
                            if w},
        "slow": [{k: s[k] for k in ("t", "ms", "prefill", "prefill_tokens", "decode", "fused", "slot_loads")
                  if k in s} for s in steps if s["ms"] > slow_ms],
        "compiles": [{"t": c["t"], "kernel": c["compile"], "next_step_ms": following[id(c)]} for c in compiles],
    }


def _stats(values: list[float]) -> str:
    """n, p50, p90, max and mean of step times (ms), on one line."""
    if not values:
        return "n=0"
    ordered = sorted(values)
    return (f"n={len(values)} p50={ordered[len(ordered) // 2]:.2f} p90={ordered[int(0.9 * (len(ordered) - 1))]:.2f} "
            f"max={ordered[-1]:.2f} mean={statistics.fmean(values):.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace_summary", description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--last-s", type=float, default=None, help="only the trace's last seconds (a measured load)")
    p.add_argument("--slow-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    steps, compiles = load(args.trace)
    print(json.dumps(summarize(steps, compiles, args.last_s, args.slow_ms), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
