"""bench.engine_loop on the tiny shape (CPU): the closed loop runs every request, steps are told apart
by kind, and the prefix probe's hits really come from the cache."""

from __future__ import annotations

import json
import sys
import time

from bench import closed_loop, engine_loop


def test_engine_loop_on_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "engine_loop", "--model", "tiny", "--device", "cpu", "--adapters", "4", "--concurrency", "8",
        "--requests", "24", "--prompt-len", "32", "--output-len", "16", "--prefix", "64", "--profile-steps", "4",
        "--out", str(tmp_path)])
    engine_loop.main()
    (path,) = tmp_path.glob("*-tiny-unmerged-loop.json")
    data = json.loads(path.read_text())
    loop = data["closed_loop"]
    assert data["benchmark"] == "engine_loop"
    assert loop["output_tokens"] == 24 * 16 and loop["requests"] == 24
    kinds = loop["by_kind"]
    assert kinds["decode_only"]["count"] > 0 and kinds["decode_only"]["decode_rows_mean"] <= 8
    assert sum(kind["count"] for kind in kinds.values()) == loop["steps"]
    prefix = data["prefix"]
    assert len(prefix["hit_ms"]) == len(prefix["miss_ms"]) == 5
    assert set(data["ratios"]) == {"closed_over_lockstep_tiny_c8", "engine_prefix_hit_over_miss_tiny"}


def test_step_kinds():
    assert closed_loop.step_kind({"prefill_seqs": 2, "decode_rows": 5}) == "mixed"
    assert closed_loop.step_kind({"prefill_seqs": 1, "decode_rows": 0}) == "prefill_only"
    assert closed_loop.step_kind({"prefill_seqs": 0, "decode_rows": 5}) == "decode_only"


def test_carry_probe_on_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "engine_loop", "--model", "tiny", "--device", "cpu", "--adapters", "2", "--concurrency", "4",
        "--requests", "8", "--prompt-len", "16", "--output-len", "4", "--profile-steps", "2", "--carry", "3",
        "--max-batched-tokens", "32", "--out", str(tmp_path)])
    engine_loop.main()
    (path,) = tmp_path.glob("*-tiny-unmerged-loop.json")
    carry = json.loads(path.read_text())["carry"]
    by_prompts = carry["by_prompts"]
    assert carry["calls"] == 6 and sorted(by_prompts, key=int) == ["0", "1", "2", "3"]
    assert by_prompts["0"]["carrying_steps"] == 0 and by_prompts["0"]["extra_ms"] == 0
    # a 32-token budget takes two 16-token prompts a step: three prompts need two steps
    assert by_prompts["1"]["carrying_steps"] == 1 and by_prompts["3"]["carrying_steps"] == 2
    assert set(carry["device_ms_by_kind"]) == {"0", "3"}  # on the CPU no kernel times: empty kinds
    assert carry["extra_device_ms_by_kind"].keys() == carry["device_ms_by_kind"]["3"].keys()
    assert carry["extra_device_ms_by_kernel"] == {}  # the same: no kernels on the CPU


class _Scheduler:
    def __init__(self, engine):
        self.engine = engine

    def schedule(self):
        return type("Batch", (), {"prefill": [], "decode": list(self.engine.running)})()


class _CountingEngine:
    """Each request runs `steps` steps; records when each was added and when each step ended."""

    def __init__(self, steps: int):
        self.steps, self.running, self.added, self.step_ends = steps, {}, [], []
        self.scheduler = _Scheduler(self)

    def add_request(self, request):
        self.running[request] = 0
        self.added.append((request, time.perf_counter(), len(self.step_ends)))

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        self.scheduler.schedule()
        outputs = []
        for request in list(self.running):
            self.running[request] += 1
            request.output_token_ids.append(0)
            if self.running[request] == self.steps:
                del self.running[request]
                outputs.append(type("Output", (), {"finished": True})())
        self.step_ends.append(time.perf_counter())
        return outputs


def _requests(count: int) -> list:
    return [type("Request", (), {"output_token_ids": []})() for _ in range(count)]


def test_closed_loop_replaces_at_once_or_after_the_arrival_delay():
    engine = _CountingEngine(steps=3)
    loop = closed_loop.closed_loop(engine, _requests(6), 2, None)
    assert loop["steps"] == 9 and [step for _, _, step in engine.added] == [0, 0, 3, 3, 6, 6]  # lockstep
    engine = _CountingEngine(steps=3)
    loop = closed_loop.closed_loop(engine, _requests(6), 2, None, arrival_delay=lambda: 0.02)
    assert len(engine.added) == 6
    for _, added_at, steps_before in engine.added[2:]:  # each replacement 20 ms after the step that freed its row
        assert added_at - engine.step_ends[steps_before - 1] >= 0.02
    assert loop["steps"] == 9 and loop["output_tokens"] == 18  # idle (asleep) while nothing runs, no empty steps
