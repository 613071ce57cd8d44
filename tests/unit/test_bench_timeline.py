"""bench.timeline's idle-gap summary on hand-made kernel intervals (the profiling itself runs on the GPU machine)."""

import pytest
import torch

from bench.timeline import idle_summary, kernel_intervals, window


def test_idle_time_overlap_and_gaps_across_streams():
    us = 1000  # intervals are in ns
    intervals = sorted([
        (0, 10 * us, "norm", 7), (10 * us, 30 * us, "matmul", 7), (12 * us, 20 * us, "shrink", 9),  # overlapped 8 us
        (45 * us, 50 * us, "expand", 7),  # 15 us idle before it
        (52 * us, 60 * us, "norm", 7),  # 2 us idle
    ])  # fmt: skip
    got = idle_summary(intervals, top=1)
    assert got["span_ms"] == pytest.approx(0.060)
    assert got["busy_ms"] == pytest.approx(0.043)
    assert got["overlap_ms"] == pytest.approx(0.008)
    assert got["idle_ms"] == pytest.approx(0.017)
    assert got["streams"] == 2
    assert got["gaps_top"] == [[15.0, "matmul", "expand"]]


def test_a_kernel_inside_another_streams_kernel_is_no_gap():
    us = 1000
    got = idle_summary([(0, 20 * us, "matmul", 7), (5 * us, 8 * us, "shrink", 9), (20 * us, 25 * us, "norm", 7)])
    assert got["idle_ms"] == 0 and got["gaps_top"] == [] and got["overlap_ms"] == pytest.approx(0.003)


def test_no_device_events_on_the_cpu():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8).sum()
    assert kernel_intervals(prof) == [] and idle_summary([])["span_ms"] == 0.0


def test_window_starts_at_the_anchor_occurrence_asked_for():
    us = 1000
    intervals = [(i * 10 * us, i * 10 * us + 4 * us, "norm" if i % 3 == 0 else f"k{i}", 7 + i % 2) for i in range(12)]
    got = window(intervals, "norm", skip=2, count=3)  # norms at 0, 3, 6, 9: the third is event 6
    assert got == [[0.0, 4.0, 7, "norm"], [10.0, 4.0, 8, "k7"], [20.0, 4.0, 7, "k8"]]
    assert window(intervals, "norm", skip=10, count=1) == [[0.0, 4.0, 8, "norm"]]  # past the last: the last one
    assert window(intervals, "absent") == []
