"""Decode-graph capture runs with the garbage collector off (cuda_graphs._no_garbage_collection): a CUDAGraph freed
by the collector mid-capture invalidates the capture. The context, and its use around each capture (CUDA stood in
for), are checked here; the GPU suite's three-engine test (test_steps_launched_ahead_on_cuda_graphs_...) is the
capture it protects."""

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


def test_each_decode_graph_capture_runs_with_the_collector_off(monkeypatch):
    """DecodeGraphs._capture with CUDA stood in for: the forward inside torch.cuda.graph sees the collector off,
    the warm-up forwards before it see it on, and capture_all collects once before capturing."""
    import contextlib

    import torch

    from server.engine import cuda_graphs

    seen = []

    class Runner:
        device = torch.device("cpu")
        prefill_in_graphs = False  # no chunk graphs

        def decode_inputs(self, requests, bucket):
            return {"input_ids": torch.zeros(bucket, dtype=torch.long)}

        def forward_decode(self, inputs, with_lora, chunks=False):
            seen.append(("capture" if capturing else "warm-up", gc.isenabled()))
            return torch.zeros(1)

    class Stream:
        def wait_stream(self, other):
            pass

    capturing = False

    @contextlib.contextmanager
    def graph(g, pool=None):
        nonlocal capturing
        capturing = True
        try:
            yield
        finally:
            capturing = False

    collected = []
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(cuda_graphs.gc, "collect", lambda *a: collected.append(True) or 0)
    graphs = cuda_graphs.DecodeGraphs(Runner(), max_rows=2, max_sequences=2)
    assert graphs.capture_all((False,)) == 2  # buckets 1 and 2
    assert collected == [True]
    assert seen == [("warm-up", True), ("warm-up", True), ("capture", False)] * 2
    assert gc.isenabled()
