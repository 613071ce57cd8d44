"""The sampler's one host sync (sampler.host_list) must not hold the GIL while the GPU works: with the
engine in a thread of the HTTP process, the event loop has to run during each step's GPU time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from server.kernels.host_device import host_list

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_host_list_equals_tolist():
    values = torch.randint(0, 1 << 20, (7, 3), device="cuda")
    assert host_list(values) == values.tolist()
    floats = torch.randn(5, device="cuda", dtype=torch.float64)
    assert host_list(floats) == floats.tolist()


def test_other_threads_run_while_host_list_waits():
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    values = torch.arange(4, device="cuda")
    torch.cuda.synchronize()
    counter = threading.Thread(target=count)
    counter.start()
    try:
        time.sleep(0.05)
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU work queued before the copy
        before = ticks
        start = time.perf_counter()
        assert host_list(values) == [0, 1, 2, 3]
        waited = time.perf_counter() - start
        during = ticks - before
    finally:
        stop.set()
        counter.join()
    assert waited > 0.05, "the wait must cover the queued GPU work for the test to mean anything"
    # Holding the GIL, the counter would get only the interpreter's forced switches (every 5 ms);
    # released, it spins freely: far more than 100 increments in 50+ ms.
    assert during > 100_000
