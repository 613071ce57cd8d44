"""The dequant scratch buffer that CUDA graphs capture: reserved at the largest NF4 weight before any capture, and an
outgrown buffer kept alive (a graph still writes to its address)."""

from __future__ import annotations

import gc
import weakref

import torch

from server.kernels.nf4 import nf4_dispatch
from tests.unit.engine_helpers import load_tiny


def test_an_outgrown_buffer_stays_allocated():
    scratch = nf4_dispatch.DequantScratch()
    cpu = torch.device("cpu")
    small = scratch.get(10, cpu, torch.bfloat16)
    alive = weakref.ref(small)
    del small
    bigger = scratch.get(20, cpu, torch.bfloat16)
    gc.collect()
    assert bigger.numel() == 20
    assert alive() is not None  # a graph that captured it may still write there
    assert scratch.get(15, cpu, torch.bfloat16) is bigger  # never shrunk, never reallocated below its size
    assert scratch.get(20, cpu, torch.float32) is not bigger  # one buffer per dtype


def test_reserve_scratch_sizes_one_buffer_for_every_layer(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(nf4_dispatch, "SCRATCH", nf4_dispatch.DequantScratch())
    model = load_tiny(tiny_llama_dir, quantize=True).model
    sizes = [m.out_features * m.in_features for m in model.modules() if getattr(m, "is_quantized", False)]
    assert len(set(sizes)) > 1  # layers of different sizes, so a lazily grown buffer would have been outgrown
    assert nf4_dispatch.reserve_scratch(model) == max(sizes)
    buffer = nf4_dispatch.SCRATCH.get(max(sizes), torch.device("cpu"), model.dtype)
    assert buffer.numel() == max(sizes)
    assert all(nf4_dispatch.SCRATCH.get(n, torch.device("cpu"), model.dtype) is buffer for n in sizes)


def test_reserve_scratch_without_nf4_layers_allocates_nothing(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(nf4_dispatch, "SCRATCH", nf4_dispatch.DequantScratch())
    model = load_tiny(tiny_llama_dir, quantize=False).model
    assert nf4_dispatch.reserve_scratch(model) == 0
    assert nf4_dispatch.SCRATCH._buffers == {}
