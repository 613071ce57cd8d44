"""Chaos-suite fixtures: server processes killed at the end of each test, figures per scenario, and a
one-run summary printed after any run that included the suite (cases, passes, peak RSS, longest
/health latency under attack). Set LORAPLEX_CHAOS_SUMMARY=<path> to also write it as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import ServerProcess, start_server, stop

_FIGURES: dict[str, dict] = {}  # test id -> figures of that scenario (assert_server_sound's dict and more)


@pytest.fixture()
def chaos_server(tiny_llama_dir, tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `python -m server` on a store (`start(store, **settings)`); all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(adapters_dir: Path, **settings) -> ServerProcess:
        server = start_server(tiny_llama_dir, adapters_dir, tmp_path / f"server-{len(started)}.log", **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        stop(server)


@pytest.fixture()
def record_figures(request) -> Callable[[dict], None]:
    """Keep a scenario's figures for the run summary."""

    def record(figures: dict) -> None:
        _FIGURES.setdefault(request.node.nodeid, {}).update(figures)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    reports = [report for key in ("passed", "failed", "error", "skipped")
               for report in terminalreporter.stats.get(key, [])
               if "tests/chaos/" in report.nodeid and getattr(report, "when", "call") in ("call", "setup")]
    outcomes: dict[str, str] = {}
    for report in reports:  # a setup error or skip, else the call's outcome
        if report.when == "call" or report.outcome != "passed":
            outcomes[report.nodeid] = report.outcome
    if not outcomes:
        return
    summary = summarize(outcomes, _FIGURES)
    terminalreporter.write_sep("=", "chaos summary")
    for nodeid, figures in sorted(_FIGURES.items()):
        terminalreporter.write_line(f"{nodeid.split('::', 1)[1]}: {json.dumps(figures)}")
    terminalreporter.write_line(
        f"cases {summary['cases']}, passed {summary['passed']}, peak RSS {summary['peak_rss_mib']} MiB, "
        f"longest /health under attack {summary['max_health_ms']} ms ({summary['health_probes']} probes)")
    path = os.environ.get("LORAPLEX_CHAOS_SUMMARY")
    if path:
        Path(path).write_text(json.dumps({**summary, "scenarios": _FIGURES}, indent=2) + "\n")


def summarize(outcomes: dict[str, str], figures: dict[str, dict]) -> dict:
    """Totals of one run: cases, passes, the highest peak RSS and the longest /health round trip."""
    return {
        "cases": len(outcomes),
        "passed": sum(outcome == "passed" for outcome in outcomes.values()),
        "peak_rss_mib": max((f.get("peak_rss_mib", 0) for f in figures.values()), default=0),
        "max_health_ms": max((f.get("max_health_ms", 0) for f in figures.values()), default=0),
        "health_probes": sum(f.get("health_probes", 0) for f in figures.values()),
    }
