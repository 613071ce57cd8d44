"""bench.serve.proc_cpu: CPU seconds of a process tree, thread by thread, from /proc."""

import multiprocessing
import sys
import threading
import time

import pytest

from bench.serve import proc_cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _spin(seconds: float, then_wait: threading.Event | None = None) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    if then_wait is not None:  # a thread that has ended is gone from /proc: it stays until the snapshot
        then_wait.wait(30)


def _spun(worker: threading.Thread) -> bool:
    """Whether the worker has spent its 0.3 s (its own clock, read from /proc)."""
    import os

    snapshot = proc_cpu.snapshot(os.getpid())
    return snapshot.get(f"{os.getpid()}/{worker.native_id}", {"cpu_s": 0})["cpu_s"] >= 0.29


def _child(stop) -> None:
    stop.wait(30)


def test_busy_thread_and_child_process_are_seen_apart():
    import os

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    child = context.Process(target=_child, args=(stop,), daemon=True)
    child.start()
    try:
        time.sleep(0.5)
        before = proc_cpu.snapshot(os.getpid())
        done = threading.Event()
        worker = threading.Thread(target=_spin, args=(0.3, done))
        worker.start()
        _spin(0.2)
        deadline = time.monotonic() + 10
        while not _spun(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        after = proc_cpu.snapshot(os.getpid())
        done.set()
        worker.join()
    finally:
        stop.set()
        child.join(10)
    result = proc_cpu.deltas(before, after, wall_s=1.0)
    api = result["api"]
    assert api["other_cpu_s"] >= 0.2  # the spinning thread (clock ticks: 10 ms)
    assert api["main_cpu_s"] >= 0.1
    assert api["all_busy"] == pytest.approx(api["main_cpu_s"] + api["other_cpu_s"], abs=1e-3)
    children = [role for role in result if role.startswith(f"child {child.pid}:")]
    assert children, result.keys()
    assert result[children[0]]["main_cpu_s"] < 0.2  # the child only waited


def _group_leader(stop) -> None:
    import os

    os.setpgrp()  # as server.launcher's API processes do
    stop.wait(30)


def test_a_child_leading_its_own_process_group_is_an_api_process():
    import os

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    children = [context.Process(target=target, args=(stop,), daemon=True) for target in (_group_leader, _child)]
    for child in children:
        child.start()
    try:
        deadline = time.monotonic() + 10
        while os.getpgid(children[0].pid) != children[0].pid and time.monotonic() < deadline:
            time.sleep(0.01)
        roles = {thread["process"] for thread in proc_cpu.snapshot(os.getpid()).values()}
    finally:
        stop.set()
        for child in children:
            child.join(10)
    assert f"api {children[0].pid}" in roles
    assert any(role.startswith(f"child {children[1].pid}:") for role in roles)
