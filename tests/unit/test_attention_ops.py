"""Paged decode attention and KV-cache writes: torch path vs the plain loop vs SDPA on a contiguous cache."""


import pytest
import torch
import torch.nn.functional as F

from server.kernels.attention.attention_ops import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_torch,
    write_kv_cache,
)
from tests.unit.triton_interp import interpreted

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_paged(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and caches with rows scattered over shuffled blocks; padding table entries are -1."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-n // block_size) for n in context_lens)) + 1
    num_blocks = len(context_lens) * max_blocks + 2
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)[: len(context_lens) * max_blocks]
    block_tables = order.view(len(context_lens), max_blocks).to(torch.int32)
    for b, n in enumerate(context_lens):
        block_tables[b, -(-n // block_size) :] = -1
    q = torch.randn(len(context_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


def sdpa_oracle(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Each row through F.scaled_dot_product_attention on its contiguous keys/values."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()  # [Hkv, n, D]
        values = v_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()
        group = q.shape[1] // num_kv_heads
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        out[b] = F.scaled_dot_product_attention(q[b, :, None].float(), keys, values, scale=scale)[:, 0]
    return out


CASES = [
    # (context_lens, Hq, Hkv, D, block_size)
    ([1], 4, 4, 64, 16),
    ([5, 0, 17, 1], 4, 2, 64, 16),
    ([33, 16, 0, 70], 8, 2, 128, 32),
    ([100, 3], 4, 1, 64, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_torch_matches_reference_and_sdpa(case, dtype):
    lens, num_q_heads, num_kv_heads, head_dim, block_size = case
    inputs = make_paged(lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    expected = paged_decode_attention_reference(*inputs, scale)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(paged_decode_attention_torch(*inputs, scale), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(paged_decode_attention(*inputs, scale), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(sdpa_oracle(*inputs, scale), expected, atol=atol, rtol=rtol)
    for b, n in enumerate(lens):
        if n == 0:
            assert not expected[b].any(), "a padding row must come out as zeros"


def test_write_kv_cache_skips_minus_one():
    num_blocks, block_size, num_kv_heads, head_dim = 4, 16, 2, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    k, v = torch.randn(4, num_kv_heads, head_dim), torch.randn(4, num_kv_heads, head_dim)
    slot_mapping = torch.tensor([-1, 37, -1, 0])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            expected_k.view(-1, num_kv_heads, head_dim)[slot] = k[t]
            expected_v.view(-1, num_kv_heads, head_dim)[slot] = v[t]
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_write_kv_cache_all_padding_is_a_no_op():
    k_cache = torch.randn(2, 16, 1, 8)
    v_cache = torch.randn_like(k_cache)
    before = k_cache.clone(), v_cache.clone()
    write_kv_cache(torch.randn(3, 1, 8), torch.randn(3, 1, 8), k_cache, v_cache, torch.full((3,), -1))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.fixture(scope="module")
def triton_attention():
    return interpreted("server.kernels.attention.triton_attention")


# The interpreter multiplies bf16 operands of tl.dot as raw uint16 (Triton 3.9), so bf16 is GPU-only.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", CASES[1:3])
def test_triton_interpreted_matches_reference(triton_attention, case, num_splits, dtype):
    lens, num_q_heads, num_kv_heads, head_dim, block_size = case
    inputs = make_paged(lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    expected = paged_decode_attention_reference(*inputs, scale)
    actual = triton_attention.paged_decode_attention_triton(*inputs, scale, num_splits=num_splits)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tuning", [{"tile_n": 16}, {"tile_n": 32}], ids=str)
def test_triton_interpreted_launch_choices_match_reference(triton_attention, tuning):
    lens, num_q_heads, num_kv_heads, head_dim, block_size = CASES[1]
    inputs = make_paged(lens, num_q_heads, num_kv_heads, head_dim, block_size, torch.float32)
    expected = paged_decode_attention_reference(*inputs, head_dim**-0.5)
    actual = triton_attention.paged_decode_attention_triton(*inputs, head_dim**-0.5, num_splits=3, tuning=tuning)
    torch.testing.assert_close(actual, expected, **dict(zip(("atol", "rtol"), TOLERANCE[torch.float32], strict=True)))
