"""LORAPLEX_STEP_TRACE: one JSON line per engine step, saying what the step ran; unset, nothing."""

from __future__ import annotations

import json
import os

import pytest

from server.engine.request import Request, SamplingParams
from server.engine.step_trace import ENV_DIR
from tests.unit.engine_helpers import make_engine


def _run(engine, prompts, n):
    for prompt in prompts:
        engine.add_request(Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    engine.trace.flush()


def test_each_step_writes_a_line_with_what_it_ran(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "trace"))
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    _run(engine, [[5, 6, 7, 8], [9, 10]], n=3)
    lines = [json.loads(x) for x in (tmp_path / "trace" / f"steps-{os.getpid()}.jsonl").read_text().splitlines()]
    # Step 1 prefills both prompts (6 tokens) and samples their first tokens; two decode steps follow.
    assert [(s["prefill"], s["prefill_tokens"], s["decode"]) for s in lines] == [(2, 6, 0), (0, 0, 2), (0, 0, 2)]
    assert [s["running"] for s in lines] == [2, 2, 0]
    assert all(s["ms"] >= s["swap_ms"] >= 0 and not s["merged"] for s in lines)
    assert [s["t"] for s in lines] == sorted(s["t"] for s in lines)


def test_without_the_variable_nothing_is_written(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    _run(engine, [[5, 6, 7]], n=2)
    assert not engine.trace.enabled and list(tmp_path.iterdir()) == []


def test_a_triton_kernel_met_for_the_first_time_is_named_in_the_trace(tmp_path):
    """The trace installs Triton's cache-miss hook (called before a kernel variant is built or loaded)."""
    triton = pytest.importorskip("triton")
    from server.engine.step_trace import StepTrace

    trace = StepTrace(str(tmp_path))
    knobs = getattr(triton, "knobs", None)
    hook = knobs.runtime.jit_cache_hook if knobs is not None else triton.runtime.jit.JITFunction.cache_hook
    try:
        assert hook(key="k", repr="_shrink_kernel[num_warps=4](x_ptr: *fp32, split_k: i32)") is False
    finally:
        if hasattr(triton, "knobs"):
            triton.knobs.runtime.jit_cache_hook = None
    trace.flush()
    (line,) = [json.loads(x) for x in (tmp_path / f"steps-{os.getpid()}.jsonl").read_text().splitlines()]
    assert line["compile"].startswith("_shrink_kernel[") and "split_k: i32" in line["compile"]


def test_each_read_into_the_cpu_tier_writes_a_line_with_its_stages(tmp_path, monkeypatch):
    """The CPU tier's reads from disk (server.registry) go to DIR/loads-<pid>.jsonl with the time each
    stage ended: the header read (the rest submitted), the tensors parsed, the digests checked."""
    import torch

    import server.pinned_pages as pinned_pages
    from server.registry import AdapterRegistry
    from tests.unit.store_helpers import make_store, peft_adapter

    monkeypatch.setenv(ENV_DIR, str(tmp_path / "trace"))
    monkeypatch.setattr(pinned_pages, "pinned", lambda n: torch.zeros(n, dtype=torch.uint8))
    store = make_store(tmp_path / "store")
    adapter = peft_adapter(seed=0)
    record = store.put("a", adapter.config_bytes, adapter.safetensors_bytes)
    registry = AdapterRegistry(store, pin_memory=True, max_bytes=64 << 20)
    registry.weights(record)
    registry.weights(record)  # cached: no read, no line
    (line,) = [json.loads(x) for x in (tmp_path / "trace" / f"loads-{os.getpid()}.jsonl").read_text().splitlines()]
    assert (line["adapter"], line["version"]) == ("a", 1)
    assert 0 < line["header"] <= line["parsed"] <= line["checked"] <= line["ms"]
