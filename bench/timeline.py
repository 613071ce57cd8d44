"""When a profiled run's GPU sat idle: kernel intervals from torch.profiler's trace, merged across streams.

A step whose host wall time exceeds its kernels' summed time is either bound by its launches or has kernels
waiting on each other across streams. The summed device time (bench.profile_step) cannot tell those apart; the
timeline can: the span from the first kernel's start to the last one's end, the time any stream was busy, the time
two or more were (a side stream running beside the main one), and the longest gaps with the kernels around them.
"""

from __future__ import annotations

KERNEL_NAME_CHARS = 80  # names in the gap list are cut to this many characters


def kernel_intervals(prof) -> list[tuple[int, int, str, int]]:
    """(start ns, end ns, name, stream) of every device event (kernels, memcpys) of a finished torch.profiler run."""
    found = []
    for event in prof.profiler.kineto_results.events():
        if str(event.device_type()).endswith("CUDA") and event.duration_ns() > 0:
            found.append((event.start_ns(), event.end_ns(), event.name(), event.device_resource_id()))
    return sorted(found)


def idle_summary(intervals: list[tuple[int, int, str, int]], top: int = 10) -> dict:
    """span, busy (any stream), overlapped (two or more streams) and idle ms of `intervals`, and the `top` longest
    idle gaps as [µs, the kernel that ended before, the kernel that started after]."""
    if not intervals:
        return {"span_ms": 0.0, "busy_ms": 0.0, "overlap_ms": 0.0, "idle_ms": 0.0, "streams": 0, "gaps_top": []}
    edges = sorted([(start, 1) for start, _, _, _ in intervals] + [(end, -1) for _, end, _, _ in intervals])
    busy = overlap = 0
    running, last = 0, edges[0][0]
    for time_ns, step in edges:
        if running >= 1:
            busy += time_ns - last
        if running >= 2:
            overlap += time_ns - last
        running, last = running + step, time_ns
    gaps = []
    reach, before = intervals[0][1], intervals[0][2]  # the latest end so far, and whose it is
    for start, end, name, _ in intervals[1:]:
        if start > reach:
            gaps.append(((start - reach) / 1e3, before[:KERNEL_NAME_CHARS], name[:KERNEL_NAME_CHARS]))
        if end > reach:
            reach, before = end, name
    span = max(end for _, end, _, _ in intervals) - intervals[0][0]
    return {"span_ms": span / 1e6, "busy_ms": busy / 1e6, "overlap_ms": overlap / 1e6, "idle_ms": (span - busy) / 1e6,
            "streams": len({stream for _, _, _, stream in intervals}),
            "gaps_top": [list(gap) for gap in sorted(gaps, key=lambda g: -g[0])[:top]]}


def window(intervals: list[tuple[int, int, str, int]], anchor: str, skip: int = 8, count: int = 60) -> list[list]:
    """`count` device events from the `skip`-th one whose name contains `anchor` (a kernel that starts a layer, so
    the window shows whole layers mid-step), each as [start µs from the window's first, duration µs, stream, name
    cut to 40 characters]: read in start order, it shows which stream each step of a layer waits on (the summed
    times cannot tell a kernel beside the main stream from one on its critical path). Empty without `anchor`."""
    starts = [i for i, (_, _, name, _) in enumerate(intervals) if anchor in name]
    if not starts:
        return []
    first = starts[min(skip, len(starts) - 1)]
    origin = intervals[first][0]
    return [[round((start - origin) / 1e3, 2), round((end - start) / 1e3, 2), stream, name[:40]]
            for start, end, name, stream in intervals[first:first + count]]
