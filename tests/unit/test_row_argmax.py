"""row_argmax against torch.argmax: random rows with ties, -inf and NaN, every dtype the sampler sees."""

from __future__ import annotations

import pytest
import torch

from server.kernels.sampling.row_argmax import num_chunks, row_argmax
from tests.unit.triton_interp import interpreted


def rows_with_ties(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Few distinct values (many ties at the max, in different chunks), some rows masked to -inf in part or whole."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (rows, vocab), generator=g).to(dtype)
    x[0] = float("-inf")  # a fully masked row: index 0
    x[1, : vocab // 2] = float("-inf")
    return x


@pytest.mark.parametrize("vocab", [128_256, 32_000, 151_936, 1_024, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_argmax_with_ties_and_masks(vocab, dtype):
    x = rows_with_ties(6, vocab, dtype, seed=vocab)
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    y = torch.randn(3, vocab).to(dtype)
    assert torch.equal(row_argmax(y), y.argmax(dim=-1))


def test_nan_counts_as_the_largest_like_argmax():
    x = torch.randn(4, 32_000)
    x[0, 31_000] = float("nan")
    x[1, 7] = x[1, 20_000] = float("nan")  # two: the first wins
    x[2, 5] = float("inf")
    got = row_argmax(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[:3].tolist() == [31_000, 7, 5]


def test_chunking():
    assert num_chunks(128_256) == 501 and 128_256 // 501 >= 128  # 256-token chunks
    assert num_chunks(32_000) == 250
    assert num_chunks(257) == 1  # a prime: plain argmax
    assert num_chunks(100) == 1  # under one chunk's worth
    assert torch.equal(row_argmax(torch.empty(0, 32_000)), torch.empty(0, dtype=torch.long))


@pytest.mark.parametrize("vocab", [128_256, 5_000, 257, 4_096])
def test_triton_kernel_equals_argmax_with_ties_masks_and_nan(vocab):
    argmax = interpreted("server.kernels.sampling.triton_argmax")
    x = rows_with_ties(5, vocab, torch.float32, seed=vocab + 1)
    x[2, vocab // 3] = float("nan")
    x[2, vocab - 1] = float("nan")
    x[3, vocab - 1] = float("inf")
    x[4] = float("-inf")
    x[4, vocab - 1] = -1.0
    assert torch.equal(argmax.row_argmax_triton(x), x.argmax(dim=-1))
    y = torch.randn(2, vocab).to(torch.bfloat16)
    assert torch.equal(argmax.row_argmax_triton(y), y.argmax(dim=-1))
