"""bench.trace_summary reads an engine step trace: times by kind and bucket, slot-load costs, slow steps
and the Triton variants met, over a window."""

from __future__ import annotations

import json
import time

from bench.trace_summary import load, main, summarize
from server.engine.step_trace import StepTrace


def _step(trace, ms, prefill=0, tokens=0, decode=0, fused=False, loads=0):
    trace.record(ms=ms, swap_ms=0.0, prefill=prefill, prefill_tokens=tokens, decode=decode, fused=fused,
                 waiting=0, running=decode + prefill, merged=False, merged_before=False, slot_loads=loads)


def test_a_trace_is_summarised_by_kind_with_slot_loads_slow_steps_and_compiles(tmp_path, capsys):
    trace = StepTrace(str(tmp_path))
    for _ in range(5):
        _step(trace, 5.0, decode=30)
    _step(trace, 18.0, prefill=1, tokens=128, decode=30, fused=True, loads=1)
    _step(trace, 8.0, prefill=1, tokens=128, decode=30, fused=True)
    trace.record(compile="_shrink_kernel[num_warps=4](split_k: i32)")
    time.sleep(0.002)  # the last step's timestamp after the others' (they are kept to 0.1 ms): the window below
    _step(trace, 2200.0, prefill=4, tokens=512)
    trace.flush()
    (path,) = tmp_path.glob("steps-*.jsonl")
    steps, compiles = load(path)
    summary = summarize(steps, compiles, slow_ms=15.0)
    assert summary["steps"] == 8 and summary["step_ms_sum"] == 2251.0
    assert summary["by_kind"]["decode 32"].startswith("n=5 p50=5.00")
    assert summary["by_kind"]["fused 192"].startswith("n=2")
    assert summary["by_kind"]["eager_prefill 512"].startswith("n=1 p50=2200.00")
    assert summary["slot_load_steps"]["fused"]["with"].startswith("n=1 p50=18.00")
    assert summary["slot_load_steps"]["fused"]["without"].startswith("n=1 p50=8.00")
    assert [s["ms"] for s in summary["slow"]] == [18.0, 2200.0]
    assert summary["compiles"] == [{"t": compiles[0]["t"], "kernel": "_shrink_kernel[num_warps=4](split_k: i32)",
                                    "next_step_ms": 2200.0}]
    assert 1 <= summarize(steps, compiles, last_s=0.0)["steps"] < 8  # the window: the last timestamp only
    assert main([str(path), "--slow-ms", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["slow"] == [summary["slow"][1]]
