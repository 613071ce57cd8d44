"""bench.run_ours.phase_seconds: an engine start's loading phases, as the engine bench records them beside its start
time (the NF4 kernels' tuning among them)."""

from __future__ import annotations

from bench.run_ours import phase_seconds
from server.model.loader import LOAD_PROGRESS, load_phase


def test_phase_seconds_counts_only_what_ran_since(monkeypatch):
    monkeypatch.setattr(LOAD_PROGRESS, "finished", {"kernels": 40.0})
    before = dict(LOAD_PROGRESS.finished)
    LOAD_PROGRESS.finished["kernels"] += 1.5  # the same phase again: only its new time counts
    with load_phase("kernel tuning"):
        pass
    phases = phase_seconds(before)
    assert phases["kernels"] == 1.5 and set(phases) == {"kernels", "kernel tuning"}
    assert phase_seconds(dict(LOAD_PROGRESS.finished)) == {}
