"""server.hop_trace marks and bench.hop_trace's table."""

import os

import pytest

from bench.hop_trace import format_rows, read, summarize
from server.hop_trace import HopTrace


def test_marks_join_by_request_across_process_files_and_rows_follow_the_hop_order(tmp_path):
    api = HopTrace(tmp_path)  # this process's file: hops-<pid>.txt
    engine_lines = []  # another process's file
    for index in range(4):
        base = 10.0 * index
        api.mark(f"r{index}", "api_received", base)
        api.mark(f"r{index}", "api_first_output", base + 0.005 + 0.001 * index)
        engine_lines.append(f"r{index} engine_received {base + 0.002:.6f}")
    (tmp_path / "hops-999999.txt").write_text("\n".join([*engine_lines, "r3 cut-short"]) + "\n")
    assert (tmp_path / f"hops-{os.getpid()}.txt").exists()
    requests = read(tmp_path)
    assert set(requests) == {"r0", "r1", "r2", "r3"}
    rows = summarize(requests, skip=1)  # r0, the earliest, left out
    assert [(row["from"], row["to"]) for row in rows] == [
        ("api_received", "engine_received"), ("engine_received", "api_first_output"),
        ("api_received", "api_first_output")]
    assert rows[0]["p50_ms"] == pytest.approx(2.0)
    assert rows[1]["p50_ms"] == pytest.approx(5.0)  # 4, 5 and 6 ms
    assert all(row["count"] == 3 for row in rows)
    assert "engine_received -> api_first_output" in format_rows(rows)


def test_off_writes_nothing(tmp_path):
    trace = HopTrace(None)
    trace.mark("r", "api_received")
    assert not trace.enabled and list(tmp_path.iterdir()) == []
