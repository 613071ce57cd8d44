"""The engine driven as a server's clients drive it, without HTTP: `concurrency` requests in flight, each
finished one replaced by the next (at once, or after an arrival delay), with every step's work and wall time
recorded. Shared by `bench.engine_loop` (which also profiles and probes) and `bench.serve`'s engine reference."""

from __future__ import annotations

import heapq
import statistics
import time
from collections import deque
from collections.abc import Callable

import torch


def sync(device: torch.device | None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


class StepLog:
    """Wraps the scheduler's schedule() to record each step's work next to its wall time: a step() call
    reads the oldest step launched (with async scheduling, the next one is launched before it is read)."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[dict] = []
        self.launched: deque[dict] = deque()
        self._schedule = engine.scheduler.schedule
        engine.scheduler.schedule = lambda *args: self._record(self._schedule(*args))

    def _record(self, batch):
        self.launched.append({
            "prefill_tokens": sum(n for _, n in batch.prefill),
            "prefill_seqs": len(batch.prefill),
            "decode_rows": len(batch.decode),
        })
        return batch

    def step(self) -> list:
        start = time.perf_counter()
        outputs = self.engine.step()
        current = self.launched.popleft()
        current["ms"] = (time.perf_counter() - start) * 1e3
        self.steps.append(current)
        return outputs


def step_kind(step: dict) -> str:
    if step["prefill_seqs"] and step["decode_rows"]:
        return "mixed"
    return "prefill_only" if step["prefill_seqs"] else "decode_only"


def summarize_steps(steps: list[dict]) -> dict:
    by_kind: dict[str, list[dict]] = {}
    for step in steps:
        by_kind.setdefault(step_kind(step), []).append(step)
    return {
        kind: {
            "count": len(group),
            "total_s": sum(s["ms"] for s in group) / 1e3,
            "ms_median": statistics.median(s["ms"] for s in group),
            "ms_p90": sorted(s["ms"] for s in group)[int(0.9 * (len(group) - 1))],
            "prefill_tokens_mean": statistics.fmean(s["prefill_tokens"] for s in group),
            "prefill_seqs_mean": statistics.fmean(s["prefill_seqs"] for s in group),
            "decode_rows_mean": statistics.fmean(s["decode_rows"] for s in group),
        }
        for kind, group in sorted(by_kind.items())
    }


def closed_loop(engine, requests: list, concurrency: int, device: torch.device, log: StepLog | None = None,
                arrival_delay: Callable[[], float] | None = None) -> dict:
    """Keep `concurrency` requests in flight until all `requests` finish; tokens/s and step summary.
    `arrival_delay` (seconds, drawn per request): a finished request's replacement reaches the engine that long
    after the step that finished it, as a client's answer and its hops to the engine would; None: at once (with
    equal lengths the loop then stays in lockstep: every request ends in the same step)."""
    log = log or StepLog(engine)
    first = len(log.steps)
    pending = deque(requests)
    due: list[float] = []  # a heap of the arrival times of replacements not yet added
    sync(device)
    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        engine.add_request(pending.popleft())
    while engine.has_unfinished() or due:
        now = time.perf_counter()
        while due and due[0] <= now:
            heapq.heappop(due)
            engine.add_request(pending.popleft())
        if not engine.has_unfinished():  # idle until the next arrival
            time.sleep(max(0.0, due[0] - now))
            continue
        for output in log.step():
            if not output.finished or len(due) >= len(pending):
                continue
            if arrival_delay is None:
                engine.add_request(pending.popleft())
            else:
                heapq.heappush(due, time.perf_counter() + arrival_delay())
    sync(device)
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in requests)
    steps = log.steps[first:]
    return {
        "requests": len(requests),
        "concurrency": concurrency,
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "steps": len(steps),
        "tokens_per_step": sum(s["prefill_tokens"] + s["decode_rows"] for s in steps) / len(steps),
        "by_kind": summarize_steps(steps),
    }
