"""Decoder-layer glue: the Triton kernels against the torch references (under the Triton interpreter,
opt-in with LORAPLEX_TRITON_INTERPRET=1), and the fused residual bookkeeping against the plain one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.kernels.glue import glue_ops
from server.kernels.split_sums import SplitSums, materialized
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
    glue = interpreted("server.kernels.glue.triton_glue")
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


@pytest.mark.parametrize("splits, with_bias", [(1, False), (4, True), (16, False)])
def test_add_rmsnorm_kernel_sums_split_partials_bit_for_bit(splits, with_bias):
    """o_proj's / down_proj's split-K partials summed by the residual add + norm as it reads them: the same h and y
    as the summed output handed to it (float16: the interpreter rounds it as torch does)."""
    glue = interpreted("server.kernels.glue.triton_glue")
    gen = torch.Generator().manual_seed(splits)
    h = torch.randn(5, 96, generator=gen).to(torch.float16)
    sums = SplitSums(torch.randn(splits, 5, 96, generator=gen), torch.randn(96, generator=gen).to(torch.float16)
                     if with_bias else None, torch.float16)
    w = torch.rand(96, generator=gen).to(torch.float16)
    got_h, got_y = glue.add_rmsnorm(h, sums, w, 1e-6)
    want_h, want_y = glue.add_rmsnorm(h, sums.materialize(), w, 1e-6)
    assert torch.equal(got_h, want_h) and torch.equal(got_y, want_y)


def test_add_rmsnorm_on_the_cpu_materializes_partials():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 32, generator=gen), torch.rand(32, generator=gen)
    sums = SplitSums(torch.randn(4, 3, 32, generator=gen), None, torch.float32)
    got = glue_ops.add_rmsnorm(h, sums, w, 1e-5)
    want = glue_ops.add_rmsnorm(h, sums.materialize(), w, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [64, 576, 100])
def test_embed_rmsnorm_kernel_gathers_rows_then_normalizes(dtype, n_cols):
    """The first norm's launch gathers the embedding rows itself: h is the table's rows exactly, y their norm."""
    glue = interpreted("server.kernels.glue.triton_glue")
    gen = torch.Generator().manual_seed(n_cols)
    table = (torch.randn(50, n_cols, generator=gen) * 3).to(dtype)
    ids = torch.tensor([3, 49, 0, 3, 17])
    w = torch.rand(n_cols, generator=gen).to(dtype)
    got_h, got_y = glue.embed_rmsnorm(ids, table, w, 1e-6)
    assert torch.equal(got_h, table[ids])
    _close(got_y, glue_ops.rmsnorm_reference(table[ids], w, 1e-6), dtype)
    empty_h, empty_y = glue.embed_rmsnorm(ids[:0], table, w, 1e-6)
    assert empty_h.shape == empty_y.shape == (0, n_cols)


def test_embed_rmsnorm_on_the_cpu_is_the_lookup_then_the_norm():
    table, w = torch.randn(20, 32), torch.rand(32)
    ids = torch.tensor([4, 4, 19])
    h, y = glue_ops.embed_rmsnorm(ids, table, w, 1e-5)
    assert torch.equal(h, table[ids]) and torch.equal(y, glue_ops.rmsnorm_reference(table[ids], w, 1e-5))


@pytest.mark.parametrize("inter", [128, 1536, 3000])
def test_silu_mul_kernel(inter):
    glue = interpreted("server.kernels.glue.triton_glue")
    gate_up = (torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).to(torch.bfloat16)
    _close(glue.silu_mul(gate_up), glue_ops.silu_mul_reference(gate_up), torch.bfloat16)


@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(4, 2, 32), (9, 3, 64)])
def test_rotary_write_kv_kernel(num_q_heads, num_kv_heads, head_dim):
    from server.kernels.attention.attention_ops import write_kv_cache

    glue = interpreted("server.kernels.glue.triton_glue")
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


def _split_sums(rows: int, cols: int, splits: int, dtype, with_bias: bool, seed: int,
                with_delta: bool = False) -> SplitSums:
    """Random partials (and bias); `with_delta`: a LoRA delta as lora_delta leaves it, row 1 (if any) a token without
    an adapter (-0.0)."""
    gen = torch.Generator().manual_seed(seed)
    partials = torch.randn(splits, rows, cols, generator=gen) * 2
    bias = torch.randn(cols, generator=gen).to(dtype) if with_bias else None
    delta = None
    if with_delta:
        delta = torch.randn(rows, cols, generator=gen) / 8
        delta[1:2] = -0.0
    return SplitSums(partials, bias, dtype, delta)


def test_split_sums_materialize_adds_the_delta_after_rounding():
    """SplitSums.delta (LORAPLEX_LORA_SIDE_EXPAND=2): the LoRA delta is added to the rounded sum and rounded again, as
    the expand adds it to the base output; a row of -0.0 (a token without an adapter) leaves the row's bits."""
    ulp = 2.0 ** -7  # bf16's spacing at 1.0
    partials = torch.tensor([1 + 0.4 * ulp, 0.0, 3.5, 1.25]).view(1, 2, 2)
    delta = torch.tensor([[0.3 * ulp, 0.0], [-0.0, -0.0]])
    out = SplitSums(partials, None, torch.bfloat16, delta).materialize()
    # rounded first: 1 + 0.4 ulp -> 1, then + 0.3 ulp -> 1 (added before rounding, 1 + 0.7 ulp would give 1 + ulp)
    assert out[0, 0].item() == 1.0
    assert torch.equal(out[1], SplitSums(partials, None, torch.bfloat16).materialize()[1])


def test_split_sums_materialize_in_split_order_then_the_bias():
    # fp32: (0 + 1e8) + 1 rounds back to 1e8, so in split order the sum is 0; any other order gives 1.
    partials = torch.tensor([1e8, 1.0, -1e8]).view(3, 1, 1)
    assert SplitSums(partials, None, torch.float32).materialize().item() == 0.0
    bias = torch.tensor([0.75], dtype=torch.bfloat16)
    assert SplitSums(partials, bias, torch.bfloat16).materialize().item() == 0.75
    assert materialized(torch.ones(2)) is not None and SplitSums(partials, None, torch.float16).shape == (1, 1)


# fp16: the interpreter truncates fp32 -> bf16 where compiled Triton and torch round to nearest, so the bit-for-bit
# comparisons run in fp16 here and in bf16 on the GPU (tests/gpu/test_glue_gpu.py).
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("splits, with_bias, rows", [(2, False, 3), (5, True, 1), (16, False, 3), (3, False, 9)])
def test_silu_mul_kernel_sums_split_partials_bit_for_bit(splits, with_bias, rows, with_delta):
    """Under 8 rows and from 8 (silu_mul's two launch shapes for partials); with a LoRA delta riding the partials
    (LORAPLEX_LORA_SIDE_EXPAND=2), added after the sum's rounding."""
    glue = interpreted("server.kernels.glue.triton_glue")
    sums = _split_sums(rows, 2 * 600, splits, torch.float16, with_bias, splits, with_delta)
    assert torch.equal(glue.silu_mul(sums), glue.silu_mul(sums.materialize()))
    if with_delta:
        assert not torch.equal(sums.materialize(), replace(sums, delta=None).materialize())


def test_a_kernel_that_adds_no_delta_refuses_partials_that_carry_one():
    glue = interpreted("server.kernels.glue.triton_glue")
    sums = _split_sums(3, 64, 2, torch.float16, False, 0, with_delta=True)
    with pytest.raises(ValueError, match="does not add a LoRA delta"):
        glue.add_rmsnorm(torch.zeros(3, 64, dtype=torch.float16), sums, torch.ones(64, dtype=torch.float16), 1e-5)


@pytest.mark.parametrize("splits, with_bias, launch", [(3, True, (1024, 4)), (16, False, (512, 8)), (1, False, None)])
def test_silu_mul_with_the_split_count_compiled_in_gives_the_same_bits(splits, with_bias, launch):
    """bench.glue_kernels' variants: the split count as a compile-time constant, other launch shapes."""
    glue = interpreted("server.kernels.glue.triton_glue")
    sums = _split_sums(9, 2 * 700, splits, torch.float16, with_bias, splits)
    expected = glue.silu_mul(sums.materialize())
    assert torch.equal(glue.silu_mul(sums, launch=launch, compiled_splits=True), expected)
    assert torch.equal(glue.silu_mul(sums, launch=launch, compiled_splits=False), expected)


@pytest.mark.parametrize("splits, with_bias, with_delta", [(3, True, False), (16, False, False), (4, True, True)])
def test_rotary_write_kv_kernel_sums_split_partials_bit_for_bit(splits, with_bias, with_delta):
    glue = interpreted("server.kernels.glue.triton_glue")
    num_q_heads, num_kv_heads, head_dim, tokens = 4, 2, 32, 5
    sums = _split_sums(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, splits, torch.float16, with_bias, 7,
                       with_delta)
    gen = torch.Generator().manual_seed(splits)
    angles = torch.rand(tokens, 1, head_dim // 2, generator=gen) * 6
    emb = torch.cat([angles, angles], dim=-1)
    rope = torch.cat([emb.cos(), emb.sin()], dim=1)
    slots = torch.tensor([3, -1, 7, 8, 0])
    caches = [torch.full((3, 4, num_kv_heads, head_dim), 9.0, dtype=torch.float16) for _ in range(4)]
    qs, ks = num_q_heads * head_dim, num_kv_heads * head_dim

    def views(t):
        return (t[:, :qs].view(tokens, num_q_heads, head_dim), t[:, qs:qs + ks].view(tokens, num_kv_heads, head_dim),
                t[:, qs + ks:].view(tokens, num_kv_heads, head_dim))

    expected = sums.materialize()
    glue.rotary_write_kv(*views(expected), rope, caches[0], caches[1], slots)
    got = torch.full(sums.shape, 5.0, dtype=torch.float16)
    glue.rotary_write_kv(*views(got), rope, caches[2], caches[3], slots, sums=sums)
    assert torch.equal(got, expected)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_qkv_rotary_write_kv_on_the_cpu_materializes_partials():
    from server.kernels.attention.attention_ops import write_kv_cache

    sums = _split_sums(3, 4 * 16, 4, torch.float32, True, 1)
    rope = torch.stack([torch.ones(3, 16), torch.zeros(3, 16)], dim=1)  # angle 0: the rotation is the identity
    caches = [torch.zeros(2, 4, 1, 16) for _ in range(4)]
    slots = torch.tensor([0, 5, -1])
    q, k, v = glue_ops.qkv_rotary_write_kv(sums, 2, 1, 16, rope, caches[0], caches[1], slots)
    whole = sums.materialize()
    assert torch.equal(q.reshape(3, -1), whole[:, :32]) and torch.equal(k.reshape(3, -1), whole[:, 32:48])
    assert torch.equal(v.reshape(3, -1), whole[:, 48:])
    write_kv_cache(whole[:, 32:48].view(3, 1, 16), whole[:, 48:].view(3, 1, 16), caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
