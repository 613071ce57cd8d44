"""weight_prefetch: which tensors a decode step's glue kernels ask the L2 for, and the model's links for it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.model import weight_prefetch


def test_decode_weights_are_the_tile_layout_only_when_on(monkeypatch):
    codes, scales = torch.zeros(512, dtype=torch.uint8), torch.zeros(16)
    nf4 = SimpleNamespace(tiled=(codes, scales))
    monkeypatch.setattr(weight_prefetch, "PREFETCH_WEIGHTS", False)
    assert weight_prefetch.decode_weights(nf4) == ()
    monkeypatch.setattr(weight_prefetch, "PREFETCH_WEIGHTS", True)
    from server.model import nf4_dispatch

    monkeypatch.setattr(nf4_dispatch, "kernel_table", lambda: nf4_dispatch.TRITON_ONLY)
    assert weight_prefetch.decode_weights(nf4) == (), "the kernels in force read bitsandbytes' layout"
    monkeypatch.setattr(nf4_dispatch, "kernel_table", lambda: nf4_dispatch.WITH_CUDA_KERNEL)
    for linear in (nf4, SimpleNamespace(base=nf4)):  # an NF4 layer, or a LoRA layer around one
        got = weight_prefetch.decode_weights(linear)
        assert len(got) == 2 and got[0] is codes and got[1] is scales
    assert weight_prefetch.decode_weights(SimpleNamespace(base=SimpleNamespace(tiled=None))) == ()
    assert weight_prefetch.decode_weights(torch.nn.Linear(2, 2)) == ()
    assert weight_prefetch.decode_weights(None) == ()


def test_each_layer_names_the_next_layers_qkv_without_owning_it(tiny_llama_dir):
    from tests.unit.engine_helpers import load_tiny

    model = load_tiny(tiny_llama_dir).model
    layers = list(model.layers)
    assert len(layers) >= 2
    for layer, after in zip(layers, layers[1:], strict=False):
        assert layer.mlp.next_qkv == (after.self_attn.qkv_proj,)
    assert layers[-1].mlp.next_qkv == ()
    names = [name for name, _ in model.named_modules()]
    assert not any("next_qkv" in name for name in names), "the link must not make qkv a submodule twice"


def test_prefetch_args_take_at_most_two_contiguous_cuda_tensors():
    pytest.importorskip("triton")
    from server.model.triton_prefetch import prefetch_args

    stand_in = torch.zeros(1)
    assert prefetch_args((), stand_in) == (stand_in, 0, stand_in, 0, False)
    with pytest.raises(ValueError, match="contiguous CUDA"):
        prefetch_args((torch.zeros(4),), stand_in)  # a CPU tensor
