"""The fused NF4 kernel (word layout) and the dequantize kernel against the torch reference,
under the Triton interpreter (opt-in: LORAPLEX_TRITON_INTERPRET=1, see tests/unit/triton_interp.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from server.kernels.nf4 import nf4_layout, nf4_ops
from tests.unit.triton_interp import interpreted

# bitsandbytes imports triton, which picks interpreter mode at its first import: set it first (as test_nf4_ops
# does), or interpreted() below skips every test here for triton "imported for a GPU".
if os.environ.get("LORAPLEX_TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
bnbf = pytest.importorskip("bitsandbytes.functional")


def _weight(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return codes, nf4_ops.nf4_absmax_float(state), tuple(state.shape), state.code


def _x(num_tokens, in_features, dtype, seed=3):
    return torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_close(got, expected, dtype):
    # The interpreter rounds fp32 -> bf16 by truncation (compiled Triton rounds to nearest even).
    atol = (2e-2 if dtype == torch.bfloat16 else 2e-3) * expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("num_tokens, out_features, in_features, tiles", [
    (1, 64, 1024, (16, 32, 2, 4)), (5, 80, 256, (16, 32, 2, 2)), (17, 96, 192, (32, 32, 1, 1)),
])  # fmt: skip
def test_words_kernel_matches_reference(num_tokens, out_features, in_features, tiles):
    triton_nf4 = interpreted("server.kernels.nf4.triton_nf4")
    codes, absmax, shape, table = _weight(out_features, in_features, seed=num_tokens)
    x = _x(num_tokens, in_features, torch.bfloat16)
    config = triton_nf4.Nf4KernelConfig(*tiles)
    got = triton_nf4.nf4_matmul_triton(x, codes, absmax, shape, table, config=config)
    _assert_close(got, nf4_ops.nf4_matmul_reference(x, codes, absmax, shape, table), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_kernel_is_exact(dtype):
    dequant = interpreted("server.kernels.nf4.triton_nf4_dequant")
    codes, absmax, shape, table = _weight(48, 320, seed=5)
    scratch = torch.full((48 * 320 + 7,), float("nan"), dtype=dtype)
    got = dequant.nf4_dequantize_triton(nf4_layout.codes_as_words(codes), absmax, table, scratch)
    expected = nf4_ops.nf4_dequantize_reference(codes, absmax, shape, table).to(dtype)
    assert torch.equal(got.view(shape), expected)
    assert scratch[-7:].isnan().all()
