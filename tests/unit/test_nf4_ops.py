"""NF4 references against bitsandbytes on CPU; the Triton kernel under the interpreter when asked.

The interpreter tests run only with LORAPLEX_TRITON_INTERPRET=1. Triton picks interpreter mode when
it is first imported (bitsandbytes imports it), so this module sets TRITON_INTERPRET=1 before its
imports; in a full-suite run where another module imported triton first, also export
TRITON_INTERPRET=1 or the tests skip.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from server.kernels.nf4 import nf4_ops

IS_INTERPRETER_WANTED = os.environ.get("LORAPLEX_TRITON_INTERPRET") == "1"
IS_TRITON_COMPILED_MODE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if IS_INTERPRETER_WANTED and not IS_TRITON_COMPILED_MODE:  # too late otherwise: leave others' guards true
    os.environ["TRITON_INTERPRET"] = "1"
bnb = pytest.importorskip("bitsandbytes")  # imports triton when installed: after the line above
bnbf = bnb.functional

# (out, in); 256x256 has 1024 quant blocks, so 4 blocks of the nested (state2) absmax quantization.
WEIGHT_SHAPES = [(4, 64), (3, 320), (17, 192), (256, 256), (96, 1088)]


def _quantize(shape, seed, dtype=torch.float32, nested=True, quant_storage=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3).to(dtype)
    codes, state = bnbf.quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4", quant_storage=quant_storage
    )
    return codes, state


def test_packing_high_nibble_holds_even_element():
    """One probe byte 0xF0 at index 5 dequantizes to +absmax at flat 10 and -absmax at flat 11."""
    codes, state = _quantize((2, 64), seed=0, nested=False)
    probe = torch.full_like(codes, 0x77)  # code 7 is 0.0
    probe[5] = 0xF0
    flat = bnbf.dequantize_4bit(probe, state).reshape(-1)
    assert flat.nonzero().flatten().tolist() == [10, 11]
    absmax = state.absmax[0].item()
    assert flat[10].item() == pytest.approx(absmax) and flat[11].item() == pytest.approx(-absmax)
    assert state.code[15] == 1.0 and state.code[7] == 0.0 and state.code[0] == -1.0


@pytest.mark.parametrize("nested", [True, False])
def test_absmax_float_matches_bnb_internals(nested):
    _, state = _quantize((256, 320), seed=1, nested=nested)
    absmax = nf4_ops.nf4_absmax_float(state)
    # bnb's own undoing of the double quant (functional.dequantize_4bit does exactly this).
    expected = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    assert absmax.dtype == torch.float32 and absmax.shape == (256 * 320 // 64,)
    assert torch.equal(absmax, expected)


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_reference_is_bit_identical_to_bnb(shape, nested):
    codes, state = _quantize(shape, seed=shape[0] * 7 + shape[1], nested=nested)
    ours = nf4_ops.nf4_dequantize_reference(codes, nf4_ops.nf4_absmax_float(state), shape, state.code)
    theirs = bnbf.dequantize_4bit(codes, state)
    assert theirs.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_reference_rounded_matches_bnb_half_dtypes(dtype):
    codes, state = _quantize((64, 512), seed=3, dtype=dtype, quant_storage=torch.bfloat16)
    ours = nf4_ops.nf4_dequantize_reference(codes, nf4_ops.nf4_absmax_float(state), (64, 512), state.code)
    assert torch.equal(ours.to(dtype), bnbf.dequantize_4bit(codes, state))


@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_reference_matches_bnb_matmul_4bit(num_tokens, dtype):
    out_features, in_features = 96, 512
    codes, state = _quantize((out_features, in_features), seed=4, dtype=dtype)
    x = torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
    bias = torch.randn(out_features, dtype=dtype)
    absmax = nf4_ops.nf4_absmax_float(state)
    ours = nf4_ops.nf4_matmul_reference(x, codes, absmax, state.shape, state.code, bias=bias)
    theirs = bnb.matmul_4bit(x, codes.t(), quant_state=state, bias=bias)
    assert ours.dtype == dtype and ours.shape == (num_tokens, out_features)
    scale = theirs.float().abs().max().item()
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-2 * scale, rtol=1e-2)
    dispatched = nf4_ops.nf4_matmul(x, codes, absmax, state.shape, state.code, bias=bias)  # CPU: reference
    assert torch.equal(dispatched, ours)


def test_rejects_bad_layouts():
    codes, state = _quantize((4, 64), seed=6)
    absmax = nf4_ops.nf4_absmax_float(state)
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_ops.nf4_dequantize_reference(codes, absmax, (8, 32), state.code)
    with pytest.raises(ValueError, match="codes hold"):
        nf4_ops.nf4_dequantize_reference(codes, absmax, (8, 64), state.code)
    with pytest.raises(ValueError, match="x must be"):
        nf4_ops.nf4_matmul_reference(torch.zeros(2, 32), codes, absmax, (4, 64), state.code)


def _interpreted_triton_nf4():
    if not IS_INTERPRETER_WANTED:
        pytest.skip("set LORAPLEX_TRITON_INTERPRET=1 to run the Triton kernel under the interpreter")
    if IS_TRITON_COMPILED_MODE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; export it too")
    pytest.importorskip("triton")
    return importlib.import_module("server.kernels.nf4.triton_nf4")


# (num_tokens, out, in, config or None): pick_config's split-K and plain tiles, explicit split-K with
# ragged out tiles, a multi-tile T (the prefill path), and T crossing the 16-row tile.
INTERPRET_CASES = [
    (1, 64, 1024, None),
    (5, 80, 256, (16, 32, 2, 2)),
    (17, 96, 192, None),
    (40, 32, 256, (64, 16, 1, 4)),
    (70, 64, 128, None),
]


@pytest.mark.parametrize("case", INTERPRET_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference_interpreted(case, dtype):
    triton_nf4 = _interpreted_triton_nf4()
    num_tokens, out_features, in_features, tiles = case
    config = None if tiles is None else triton_nf4.Nf4KernelConfig(*tiles)
    codes, state = _quantize((out_features, in_features), seed=num_tokens)
    absmax = nf4_ops.nf4_absmax_float(state)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(num_tokens, 2 * in_features, generator=gen).to(dtype)[:, ::2]  # strided x
    bias = torch.randn(out_features, generator=gen).to(dtype)
    padded = torch.full((num_tokens, out_features + 3), float("nan"), dtype=dtype)
    out = padded[:, 1 : 1 + out_features]  # strided out; its neighbours must stay untouched
    got = triton_nf4.nf4_matmul_triton(
        x, codes, absmax, state.shape, state.code, out=out, bias=bias, config=config
    )
    expected = nf4_ops.nf4_matmul_reference(x, codes, absmax, state.shape, state.code, bias=bias)
    assert got is out
    assert padded[:, 0].isnan().all() and padded[:, 1 + out_features :].isnan().all()
    # The interpreter rounds fp32 -> bf16 by truncation (compiled Triton rounds to nearest even),
    # which costs up to ~2 bf16 ulps of the largest output; fp16 rounds to nearest in both.
    atol = (2e-2 if dtype == torch.bfloat16 else 2e-3) * expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("in_features, out_features", [(2048, 2048), (8192, 2048), (14336, 4096), (4096, 28672)])
@pytest.mark.parametrize("num_tokens", [1, 8, 32, 64, 300, 8192])
def test_pick_config_is_launchable(in_features, out_features, num_tokens):
    triton_nf4 = pytest.importorskip("server.kernels.nf4.triton_nf4")
    config = triton_nf4.pick_config(num_tokens, out_features, in_features, num_sms=132)
    assert (in_features // 64) % (config.split_k * config.k_groups) == 0
    assert config.block_t >= 16 and (num_tokens > 64 or config.block_t >= num_tokens)
    partial_bytes = 8 * config.split_k * num_tokens * out_features if config.split_k > 1 else 0
    assert partial_bytes <= out_features * in_features // 4  # at most half the code bytes


def test_dequant_linear_matches_the_reference():
    """dequant + cuBLAS (nf4_dispatch.dequant_linear, the dequantize kernel under the interpreter), bias included."""
    _interpreted_triton_nf4()
    from server.kernels.nf4 import nf4_dispatch

    codes, state = _quantize((320, 192), seed=9)
    absmax, shape = nf4_ops.nf4_absmax_float(state), tuple(state.shape)
    gen = torch.Generator().manual_seed(2)
    x, bias = torch.randn(5, 192, generator=gen), torch.randn(320, generator=gen)
    got = nf4_dispatch.dequant_linear(x, codes, absmax, shape, state.code, bias)
    weight = nf4_ops.nf4_dequantize_reference(codes, absmax, shape, state.code)
    torch.testing.assert_close(got, x @ weight.t() + bias, rtol=1e-5, atol=1e-4)
