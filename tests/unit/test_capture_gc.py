"""Decode-graph capture runs with the garbage collector off (cuda_graphs._no_garbage_collection): a CUDAGraph freed
by the collector mid-capture invalidates the capture. The context itself is checked here; the GPU suite's
three-engine test (test_steps_launched_ahead_on_cuda_graphs_...) is the capture it protects."""

from __future__ import annotations

import gc

from server.engine.cuda_graphs import _no_garbage_collection


def test_collector_is_off_inside_and_restored_after_even_on_error():
    assert gc.isenabled()
    with _no_garbage_collection():
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with _no_garbage_collection():
            raise RuntimeError("capture failed")
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_collector_left_off_when_it_was_off():
    gc.disable()
    try:
        with _no_garbage_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
