"""Decoder-layer glue: the Triton kernels against the torch references (under the Triton interpreter,
opt-in with LORAPLEX_TRITON_INTERPRET=1), and the fused residual bookkeeping against the plain one."""

from __future__ import annotations

import pytest
import torch

from server.model import glue_ops
from tests.unit.triton_interp import interpreted


def _close(got, expected, dtype):
    # One rounding to dtype may differ (summation order, fused multiply-add): at most one ulp.
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got.float(), expected.float(), atol=ulp * 2 * expected.float().abs().max().item(),
                               rtol=ulp * 2)


def test_fused_residual_equals_plain_residual():
    gen = torch.Generator().manual_seed(0)
    h, a, m = (torch.randn(5, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    w = torch.rand(64, generator=gen).to(torch.bfloat16)
    h1 = h + a
    expected = glue_ops.rmsnorm_reference(h1 + m, w, 1e-5)
    h2, _ = glue_ops.add_rmsnorm(h, a, w, 1e-5)
    h3, got = glue_ops.add_rmsnorm(h2, m, w, 1e-5)
    assert torch.equal(h2, h1) and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols, with_add", [(64, True), (576, False), (2048, True), (100, True)])
def test_add_rmsnorm_kernel(dtype, n_cols, with_add):
    glue = interpreted("server.model.triton_glue")
    gen = torch.Generator().manual_seed(n_cols)
    h = (torch.randn(7, n_cols, generator=gen) * 3).to(dtype)
    delta = torch.randn(7, n_cols, generator=gen).to(dtype) if with_add else None
    w = torch.rand(n_cols, generator=gen).to(dtype)
    got_h, got_y = glue.add_rmsnorm(h, delta, w, 1e-6)
    ref_h = h + delta if with_add else h
    if dtype == torch.float16:
        assert torch.equal(got_h, ref_h)
    else:  # the interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest: tests/gpu checks equality)
        _close(got_h, ref_h, dtype)
    _close(got_y, glue_ops.rmsnorm_reference(ref_h, w, 1e-6), dtype)


@pytest.mark.parametrize("inter", [128, 1536, 3000])
def test_silu_mul_kernel(inter):
    glue = interpreted("server.model.triton_glue")
    gate_up = (torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).to(torch.bfloat16)
    _close(glue.silu_mul(gate_up), glue_ops.silu_mul_reference(gate_up), torch.bfloat16)


@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(4, 2, 32), (9, 3, 64)])
def test_rotary_write_kv_kernel(num_q_heads, num_kv_heads, head_dim):
    from server.model.attention_ops import write_kv_cache

    glue = interpreted("server.model.triton_glue")
    gen = torch.Generator().manual_seed(head_dim)
    tokens, block_size, num_blocks = 6, 4, 5
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(torch.bfloat16)
    qs, ks = num_q_heads * head_dim, num_kv_heads * head_dim
    views = lambda t: (t[:, :qs].view(tokens, num_q_heads, head_dim),  # noqa: E731
                       t[:, qs:qs + ks].view(tokens, num_kv_heads, head_dim),
                       t[:, qs + ks:].view(tokens, num_kv_heads, head_dim))
    angles = torch.rand(tokens, 1, head_dim // 2, generator=gen) * 6
    emb = torch.cat([angles, angles], dim=-1)
    rope = torch.cat([emb.cos(), emb.sin()], dim=1)  # [T, 2, D]
    slots = torch.tensor([3, -1, 7, 8, 19, 0])
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 9.0, dtype=torch.bfloat16) for _ in range(4)]

    q_ref, k_ref, v_ref = views(qkv.clone())
    q_ref = glue_ops.apply_rotary_reference(q_ref, rope[:, 0:1], rope[:, 1:2])
    k_ref = glue_ops.apply_rotary_reference(k_ref, rope[:, 0:1], rope[:, 1:2])
    write_kv_cache(k_ref, v_ref, caches[0], caches[1], slots)

    work = qkv.clone()
    q, k, v = views(work)
    glue.rotary_write_kv(q, k, v, rope, caches[2], caches[3], slots)
    _close(q, q_ref, torch.bfloat16)
    _close(k, k_ref, torch.bfloat16)
    assert torch.equal(v, v_ref)
    _close(caches[2], caches[0], torch.bfloat16)
    assert torch.equal(caches[3], caches[1])  # untouched slots keep their 9.0, the -1 row wrote nothing
