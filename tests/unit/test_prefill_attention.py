"""Variable-length prefill attention: the one-launch Triton kernel (under the interpreter, opt-in with
LORAPLEX_TRITON_INTERPRET=1) against the per-sequence torch SDPA path, on mixed fresh and chunked
sequences of unequal lengths."""

from __future__ import annotations

import pytest
import torch

from server.kernels.attention.attention_ops import prefill_attention_torch, write_kv_cache
from server.model.llama import PrefillSeq
from tests.unit.triton_interp import interpreted


def _case(lengths, prefixes, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, seed=0):
    """Random q/k/v for chunks of `lengths` tokens after cached `prefixes`; the cache holds the prefixes
    and (as the model writes them before attending) the chunks."""
    gen = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-(p + n) // block_size) for n, p in zip(lengths, prefixes, strict=True)) + 2
    k_cache = torch.randn(total_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(total_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    order = torch.randperm(total_blocks, generator=gen).tolist()  # scattered blocks
    num_tokens = sum(lengths)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    seqs, slots, q_start = [], [], 0
    for n, p in zip(lengths, prefixes, strict=True):
        blocks = [order.pop() for _ in range(-(-(p + n) // block_size))]
        seqs.append(PrefillSeq(q_start, n, p + n, torch.tensor(blocks)))
        slots += [blocks[pos // block_size] * block_size + pos % block_size for pos in range(p, p + n)]
        q_start += n
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots))
    return q, k, v, k_cache, v_cache, seqs


@pytest.mark.parametrize("lengths, prefixes", [
    ([5, 70, 1, 33], [0, 0, 0, 0]),      # fresh prompts of unequal lengths
    ([17, 40, 64], [30, 0, 129]),        # chunks after cached prefixes, mixed with a fresh prompt
    ([130], [0]),                        # one prompt over several query tiles
])  # fmt: skip
def test_triton_prefill_matches_sdpa(lengths, prefixes):
    kernel = interpreted("server.kernels.attention.triton_prefill_attention")
    q, k, v, k_cache, v_cache, seqs = _case(lengths, prefixes)
    expected = prefill_attention_torch(q, k, v, k_cache, v_cache, seqs, None, scale=0.125)
    got = kernel.prefill_attention_triton(q, k_cache, v_cache, seqs, scale=0.125, block_m=32, block_n=32)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_torch_path_groups_equal_to_ungrouped():
    q, k, v, k_cache, v_cache, seqs = _case([12, 12, 5], [0, 0, 0], seed=3)
    rows = torch.tensor([[0] * 12, [12] * 12]) + torch.arange(12)
    single = (24 + torch.arange(5))[None, :]  # fresh_groups covers every whole prompt (the runner's contract)
    grouped = prefill_attention_torch(q, k, v, k_cache, v_cache, seqs, [rows, single], 0.125)
    alone = prefill_attention_torch(q, k, v, k_cache, v_cache, seqs, None, 0.125)
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-5)
