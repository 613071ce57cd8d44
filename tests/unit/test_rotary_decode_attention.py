"""rotary_decode_attention: the qkv output's rotary, the new k/v's cache write and decode attention in one Triton
kernel (server.kernels.attention.triton_attention, under the interpreter), against the two ops it replaces (glue_ops'
qkv_rotary_write_kv, then the attention reference); the CPU dispatch is those two ops."""

from __future__ import annotations

import pytest
import torch

from server.kernels.attention.attention_ops import paged_decode_attention_reference
from server.kernels.attention.rotary_attention import rotary_decode_attention
from server.kernels.glue import glue_ops
from server.kernels.split_sums import SplitSums
from tests.unit.test_attention_ops import TOLERANCE, make_paged
from tests.unit.triton_interp import interpreted

CASES = [
    # (context_lens incl. the new token; 0 = a padding row, slot -1), Hq, Hkv, D, block_size
    ([5, 0, 17, 1], 4, 2, 64, 16),
    ([33, 16, 70], 8, 2, 128, 32),
]


def decode_step(case, dtype, splits: int = 0, bias: bool = False, seed: int = 0, delta: bool = False):
    """(qkv as a tensor or split-K partials (`delta`: with a LoRA delta riding them, its first row a token without an
    adapter), rope [B, 2, D], slot_mapping, caches, block_tables, context_lens)."""
    lens, num_q_heads, num_kv_heads, head_dim, block_size = case
    _, k_cache, v_cache, block_tables, context_lens = make_paged(lens, num_q_heads, num_kv_heads, head_dim,
                                                                 block_size, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    slots = [int(block_tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
             for b, n in enumerate(lens)]
    angles = torch.rand(len(lens), head_dim // 2, generator=gen) * 6.28
    angles = torch.cat([angles, angles], dim=-1)
    rope = torch.stack([angles.cos(), angles.sin()], dim=1)  # [B, 2, D]
    if splits:
        partials = torch.randn(splits, len(lens), width, generator=gen) / splits
        lora = None
        if delta:
            lora = torch.randn(len(lens), width, generator=gen) / 8
            lora[0] = -0.0
        qkv = SplitSums(partials, torch.randn(width, generator=gen).to(dtype) if bias else None, dtype, lora)
    else:
        qkv = torch.randn(len(lens), width, generator=gen).to(dtype)
    return qkv, rope, torch.tensor(slots), k_cache, v_cache, block_tables, context_lens


def two_ops(qkv, num_q_heads, rope, slots, k_cache, v_cache, block_tables, context_lens, scale):
    """The oracle: the rotary + cache-write op, then the attention reference (on copies of the caches)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q, _, _ = glue_ops.qkv_rotary_write_kv(qkv, num_q_heads, num_kv_heads, head_dim, rope, k_cache, v_cache, slots)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale), k_cache, v_cache


def test_cpu_dispatch_is_the_two_ops():
    case = CASES[0]
    qkv, rope, slots, k_cache, v_cache, tables, lens = decode_step(case, torch.float32)
    expected, expected_k, expected_v = two_ops(qkv, case[1], rope, slots, k_cache, v_cache, tables, lens, 0.125)
    out = rotary_decode_attention(qkv, case[1], case[2], case[3], rope, k_cache, v_cache, slots, tables, lens, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.fixture(scope="module")
def triton_attention():
    return interpreted("server.kernels.attention.triton_attention")


# The interpreter multiplies bf16 operands of tl.dot as raw uint16 (Triton 3.9), so bf16 is GPU-only.
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype,source", [(torch.float32, "tensor"), (torch.float32, "partials"),
                                          (torch.float16, "tensor"), (torch.float16, "partials+bias"),
                                          (torch.float16, "partials+delta")])
@pytest.mark.parametrize("case", CASES, ids=["gqa2-d64", "gqa4-d128"])
@pytest.mark.parametrize("fresh_kv", [False, True], ids=["read-back", "fresh-kv"])
def test_interpreted_kernel_matches_the_two_ops(triton_attention, case, source, num_splits, dtype, fresh_kv):
    """Same attention, and the caches hold the same rotated k and v at the new slots (padding rows write none); with
    fresh_kv the rows' new k and v are taken from registers, not read back from the cache."""
    splits = {"tensor": 0, "partials": 4, "partials+bias": 16, "partials+delta": 3}[source]
    qkv, rope, slots, k_cache, v_cache, tables, lens = decode_step(case, dtype, splits, bias=source.endswith("bias"),
                                                                   delta=source.endswith("delta"))
    scale = case[3] ** -0.5
    expected, expected_k, expected_v = two_ops(qkv, case[1], rope, slots, k_cache, v_cache, tables, lens, scale)
    before_k = k_cache.clone()
    out = triton_attention.rotary_decode_attention_triton(qkv, case[1], rope, k_cache, v_cache, slots, tables, lens,
                                                          scale, num_splits=num_splits,
                                                          tuning={"fresh_kv": fresh_kv})
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_cache, expected_k, atol=atol, rtol=rtol)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0)
    assert not torch.equal(k_cache, before_k)  # the new tokens' keys were written


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("source", ["tensor", "partials+delta"])
@pytest.mark.parametrize("fresh_kv", [False, True], ids=["read-back", "fresh-kv"])
def test_interpreted_kernel_at_whole_tiles_matches_the_two_ops(triton_attention, source, num_splits, fresh_kv):
    """Contexts of 64, 128 and 192 positions: each row's last tile ends at the position its program stores."""
    case = ([64, 128, 192, 0], 4, 2, 64, 16)
    splits = {"tensor": 0, "partials+delta": 3}[source]
    qkv, rope, slots, k_cache, v_cache, tables, lens = decode_step(case, torch.float32, splits,
                                                                   delta=source.endswith("delta"))
    scale = case[3] ** -0.5
    expected, expected_k, expected_v = two_ops(qkv, case[1], rope, slots, k_cache, v_cache, tables, lens, scale)
    out = triton_attention.rotary_decode_attention_triton(qkv, case[1], rope, k_cache, v_cache, slots, tables, lens,
                                                          scale, num_splits=num_splits, tuning={"fresh_kv": fresh_kv})
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_cache, expected_k, atol=atol, rtol=rtol)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0)


def test_rejects_a_qkv_width_that_does_not_match_the_heads(triton_attention):
    qkv, rope, slots, k_cache, v_cache, tables, lens = decode_step(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="qkv width"):
        triton_attention.rotary_decode_attention_triton(qkv[:, :-64], 4, rope, k_cache, v_cache, slots, tables, lens,
                                                        0.125)


def test_decode_tuning_overrides_parse_names_and_values():
    from server.kernels.attention.decode_tuning import tuning_overrides

    assert tuning_overrides("") == {}
    assert tuning_overrides("num_warps=4, tile_n=32,fresh_kv=true") == {"num_warps": 4, "tile_n": 32,
                                                                        "fresh_kv": True}
    assert tuning_overrides("maxnreg=128,num_stages=none") == {"maxnreg": 128, "num_stages": None}
    for bad in ("warps=4", "num_warps", "num_warps=four", "num_warps=true", "fresh_kv=1", "maxnreg=0",
                "num_warps=none"):
        with pytest.raises(ValueError, match="LORAPLEX_DECODE_TUNING"):
            tuning_overrides(bad)
