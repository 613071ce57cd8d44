"""Opt-in per-step trace for diagnosing serving runs on a GPU host (no debugger, no ptrace there):
LORAPLEX_STEP_TRACE=DIR makes each engine write DIR/steps-<pid>.jsonl, one JSON object per step: seconds
since the engine started (`t`), the step's wall time with any swap before it (`ms`), the swap alone
(`swap_ms`), prefill requests and tokens, decode rows, waiting and running requests after scheduling,
whether merged weights served the step, and the slot loads the step started. A few hundred lines a
second, buffered; off by default. Each Triton kernel variant the process meets for the first time (a
compile, or a load from Triton's disk cache: 0.1-2.7 s inside a step on the H200) adds a line
{"t", "compile": kernel and argument specialization}, so a slow step names its cause."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV_DIR = "LORAPLEX_STEP_TRACE"
_FLUSH_EVERY = 200  # lines


class StepTrace:
    """Appends one line per step to DIR/steps-<pid>.jsonl; `enabled` False (no env var): does nothing."""

    def __init__(self, directory: str | None = None, kind: str = "steps"):
        """`kind` names the file (DIR/<kind>-<pid>.jsonl): "steps" for the engine, "loads" for the CPU
        tier's reads (server.registry: one line per adapter read from disk, with its stages)."""
        directory = directory if directory is not None else os.environ.get(ENV_DIR)
        self.enabled = bool(directory)
        self._file = None
        self._pending = 0
        self._start = time.perf_counter()
        if self.enabled:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(directory) / f"{kind}-{os.getpid()}.jsonl", "a")  # noqa: SIM115 (kept open)
            if kind == "steps":
                _on_triton_compile(lambda description: self.record(compile=description))

    def record(self, **fields) -> None:
        if self._file is None:
            return
        line = {"t": round(time.perf_counter() - self._start, 4), **fields}
        self._file.write(json.dumps(line) + "\n")
        self._pending += 1
        if self._pending >= _FLUSH_EVERY:
            self.flush()

    def record_step(self, start: float, scheduled: float, batch, fused: bool, scheduler, merged: bool,
                    merged_before: bool, slot_loads: int) -> None:
        """The line of one engine step: `start` before its swap (if any), `scheduled` after it (perf_counter
        seconds), `batch` what it ran, `scheduler` the queues after it."""
        self.record(ms=round((time.perf_counter() - start) * 1e3, 3), swap_ms=round((scheduled - start) * 1e3, 3),
                    prefill=len(batch.prefill), prefill_tokens=sum(n for _, n in batch.prefill),
                    decode=len(batch.decode), fused=fused, waiting=len(scheduler.waiting),
                    running=len(scheduler.running), merged=merged, merged_before=merged_before,
                    slot_loads=slot_loads)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._pending = 0


def _on_triton_compile(callback) -> None:
    """Call `callback(kernel description)` before Triton builds (or loads from disk) a kernel variant the
    process has not run yet; nothing when Triton is absent."""
    try:
        import triton
    except ImportError:
        return

    def hook(*args, **kwargs) -> bool:
        callback(str(kwargs.get("repr", args[0] if args else "?"))[:400])
        return False  # not handled: compile as usual

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
        knobs.runtime.jit_cache_hook = hook
    else:  # Triton before knobs
        triton.runtime.jit.JITFunction.cache_hook = hook
