"""rotary_decode_attention's one Triton kernel on a CUDA GPU against the two Triton kernels it replaces (the rotary
and cache-write glue kernel, then decode attention) and the attention reference: bf16, the 1B and 8B engine shapes,
qkv as a tensor or as split-K partials, eager and replayed from a CUDA graph. Timings print with
`pytest -s -k timings`; nothing asserts on them."""

from __future__ import annotations

import pytest
import torch

from server.kernels.attention.attention_ops import paged_decode_attention_reference
from server.kernels.glue import glue_ops
from server.kernels.split_sums import SplitSums
from tests.gpu.test_triton_kernels import capture, graph_time_us, widened_tables
from tests.unit.test_rotary_decode_attention import decode_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CASES = [
    # (context_lens incl. the new token, Hq, Hkv, D, block_size)
    ([192], 32, 8, 128, 16),  # 8B, batch 1: split 8 ways
    ([192] * 32, 32, 8, 64, 16),  # 1B, batch 32
    ([1, 0, 17, 4100], 32, 8, 128, 16),
    ([5, 4000, 77], 28, 4, 128, 16),  # 7 query heads per kv head
    ([513, 2, 0, 31, 32, 33], 16, 4, 64, 32),
]


@pytest.fixture(scope="module")
def triton_attention():
    pytest.importorskip("triton")
    from server.kernels.attention import triton_attention

    return triton_attention


def cuda_step(case, splits: int = 0, bias: bool = False, seed: int = 0, delta: bool = False):
    qkv, *rest = decode_step(case, torch.bfloat16, splits, bias, seed, delta)
    if isinstance(qkv, SplitSums):
        qkv = SplitSums(qkv.partials.cuda(), None if qkv.bias is None else qkv.bias.cuda(), qkv.dtype,
                        None if qkv.delta is None else qkv.delta.cuda())
    else:
        qkv = qkv.cuda()
    return qkv, *(t.cuda() for t in rest)


def two_kernels(triton_attention, qkv, num_q_heads, rope, slots, k_cache, v_cache, tables, lens, scale, **kw):
    """The unfused path on copies of the caches (and of qkv, which the rotary glue kernel rotates in place): the
    rotary glue kernel, then the decode attention kernel(s)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    qkv = qkv.clone() if isinstance(qkv, torch.Tensor) else qkv
    q, _, _ = glue_ops.qkv_rotary_write_kv(qkv, num_q_heads, k_cache.shape[2], k_cache.shape[3], rope, k_cache,
                                           v_cache, slots)
    out = triton_attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, **kw)
    return out, q, k_cache, v_cache


@pytest.mark.parametrize("fresh_kv", [False, True], ids=["read-back", "fresh-kv"])
@pytest.mark.parametrize("source", ["tensor", "partials", "partials+bias", "partials+delta"])
@pytest.mark.parametrize("case", CASES, ids=["8b-b1", "1b-b32", "mixed", "gqa7", "d64-bs32"])
def test_one_kernel_matches_the_two_kernels_and_the_reference(triton_attention, case, source, fresh_kv):
    """partials+delta: a LoRA delta riding the partials (LORAPLEX_LORA_SIDE_EXPAND=2); the rotary glue kernel then
    writes the same v, bit for bit, as from the materialized output. fresh_kv: the rows' new k and v taken from
    registers (DECODE_TUNING's fresh_kv)."""
    _check_one_kernel(triton_attention, case, source, {"fresh_kv": fresh_kv})


def _check_one_kernel(triton_attention, case, source, tuning):
    splits = {"tensor": 0, "partials": 16, "partials+bias": 5, "partials+delta": 3}[source]
    qkv, rope, slots, k_cache, v_cache, tables, lens = cuda_step(case, splits, bias=source.endswith("bias"),
                                                                 delta=source.endswith("delta"))
    scale = case[3] ** -0.5
    expected, q, expected_k, expected_v = two_kernels(triton_attention, qkv, case[1], rope, slots, k_cache, v_cache,
                                                      tables, lens, scale)
    if source.endswith("delta"):
        *_, plain_v = two_kernels(triton_attention, qkv.materialize(), case[1], rope, slots, k_cache, v_cache, tables,
                                  lens, scale)
        assert torch.equal(plain_v, expected_v)
    out = triton_attention.rotary_decode_attention_triton(qkv, case[1], rope, k_cache, v_cache, slots, tables, lens,
                                                          scale, tuning=tuning)
    assert torch.equal(v_cache, expected_v)
    torch.testing.assert_close(k_cache, expected_k, atol=2e-2, rtol=1e-2)  # rotated in another kernel: <= 1 ulp
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    reference = paged_decode_attention_reference(q, expected_k, expected_v, tables, lens, scale)
    torch.testing.assert_close(out, reference, atol=6e-2, rtol=3e-2)


def test_graph_replays_follow_their_inputs(triton_attention):
    """Captured once (split 4 ways), replayed with other contexts, tokens, tables and slots: each replay gives the
    two kernels' answer."""
    case = ([700] * 4, 32, 8, 128, 16)  # every row's table whole: rolled, each row still reads real blocks
    qkv, rope, slots, k_cache, v_cache, tables, lens = cuda_step(case)
    out = torch.empty(len(case[0]), 32, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out.copy_(triton_attention.rotary_decode_attention_triton(qkv, 32, rope, k_cache, v_cache, slots, tables,
                                                                   lens, 128**-0.5, num_splits=4))

    graph = capture(step)
    for seed, new_lens in enumerate(([1, 64, 0, 30], [64, 17, 16, 2], [700, 192, 1, 64]), start=1):
        fresh = cuda_step((new_lens, *case[1:]), seed=seed)
        lens.copy_(torch.tensor(new_lens))
        qkv.copy_(fresh[0])
        rope.copy_(fresh[1])
        tables.copy_(tables.roll(seed, dims=0))
        slots.copy_(torch.tensor([int(tables[b, (n - 1) // 16]) * 16 + (n - 1) % 16 if n else -1
                                  for b, n in enumerate(new_lens)]))
        before_k, before_v = k_cache.clone(), v_cache.clone()
        graph.replay()
        expected, _, _, _ = two_kernels(triton_attention, qkv, 32, rope, slots, before_k, before_v, tables, lens,
                                        128**-0.5, num_splits=4)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def test_one_kernel_at_the_engine_shapes_with_timings(triton_attention):
    """At the engine benches' shapes (contexts of 192; the 8B batch-1 step's table of 256 blocks) the one kernel
    computes the two kernels' attention; read with -s for both paths' times by graph replay (never asserted)."""
    shapes = [("8b b1", ([192], 32, 8, 128, 16), 0, 256), ("8b b32", ([192] * 32, 32, 8, 128, 16), 0, 16),
              ("8b b32 partials", ([192] * 32, 32, 8, 128, 16), 2, 16),
              ("1b b32 partials", ([192] * 32, 32, 8, 64, 16), 4, 16)]
    for label, case, splits, max_blocks in shapes:
        qkv, rope, slots, k_cache, v_cache, tables, lens = cuda_step(case, splits)
        tables = widened_tables(tables, max_blocks)
        scale = case[3] ** -0.5
        expected, *_ = two_kernels(triton_attention, qkv, case[1], rope, slots, k_cache, v_cache, tables, lens, scale)
        out = triton_attention.rotary_decode_attention_triton(qkv, case[1], rope, k_cache, v_cache, slots, tables,
                                                              lens, scale)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
        unfused, fused, fresh = _timed_pair(triton_attention, case, splits, max_blocks)
        print(f"\nrotary decode attention {label}: two kernels {graph_time_us(unfused):.2f} us, "
              f"one {graph_time_us(fused):.2f} us, one with fresh_kv {graph_time_us(fresh):.2f} us")


def _timed_pair(triton_attention, case, splits, max_blocks):
    """(the two kernels, the one kernel, the one kernel with fresh_kv) as calls on one step's inputs, its block
    tables max_blocks wide."""
    qkv, rope, slots, k_cache, v_cache, tables, lens = cuda_step(case, splits)
    tables = widened_tables(tables, max_blocks)
    num_q_heads, num_kv_heads, head_dim = case[1:4]
    scale = head_dim**-0.5

    def unfused():
        q, _, _ = glue_ops.qkv_rotary_write_kv(qkv, num_q_heads, num_kv_heads, head_dim, rope, k_cache, v_cache, slots)
        triton_attention.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale)

    def fused(fresh_kv=False):
        triton_attention.rotary_decode_attention_triton(qkv, num_q_heads, rope, k_cache, v_cache, slots, tables, lens,
                                                        scale, tuning={"fresh_kv": fresh_kv})

    return unfused, fused, lambda: fused(True)


COLD_CHOICES = [({}, None), ({"fresh_kv": True}, None)]


def test_rotary_decode_attention_choices_with_each_layer_cold(triton_attention):
    """The 8B batch-32 step's attention (contexts of 192, qkv's split-K partials) as a step meets it: 32 calls in a
    row, each on another layer's cache and partials (800 MB of cache, where the one-layer timings above read theirs
    from the 50 MB L2), under each launch choice (DECODE_TUNING's entries, LORAPLEX_DECODE_TUNING in the engine, and
    the split count): each computes the default's attention; read with -s for each one's time a layer (never
    asserted). At 8 warps an SM holds one program (194 registers), so the 256 programs run in two waves."""
    case = ([192] * 32, 32, 8, 128, 16)
    layers = [cuda_step(case, splits=2, seed=seed) for seed in range(32)]
    scale = 128**-0.5

    def attend(layer, tuning, num_splits):
        qkv, rope, slots, k_cache, v_cache, tables, lens = layer
        return triton_attention.rotary_decode_attention_triton(qkv, 32, rope, k_cache, v_cache, slots, tables, lens,
                                                               scale, num_splits=num_splits, tuning=tuning)

    expected = attend(layers[0], {}, None)
    for tuning, num_splits in COLD_CHOICES:
        torch.testing.assert_close(attend(layers[0], tuning, num_splits), expected, atol=2e-2, rtol=2e-2)
        us = graph_time_us(lambda: [attend(layer, tuning, num_splits) for layer in layers],  # noqa: B023
                           calls=1, replays=10) / len(layers)
        print(f"\nrotary decode attention 8b b32, each layer cold, {tuning} splits={num_splits}: {us:.2f} us a layer")

