"""Triton LoRA and paged-attention kernels vs their plain-loop references on a CUDA GPU, eager and replayed
from a CUDA graph. Timings print with `pytest -s -k timing`; nothing asserts on them."""

import random

import pytest
import torch

from server.kernels.attention.attention_ops import paged_decode_attention_reference, write_kv_cache
from server.kernels.lora.lora_ops import decode_lora_meta, lora_apply_reference, make_lora_meta
from tests.lora_pools import mixed_ranks, random_pool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 3e-2)}
DEVICE = "cuda"


@pytest.fixture(scope="module")
def triton_lora():
    pytest.importorskip("triton")
    from server.kernels.lora import triton_lora

    return triton_lora


@pytest.fixture(scope="module")
def triton_attention():
    pytest.importorskip("triton")
    from server.kernels.attention import triton_attention

    return triton_attention


def time_us(fn, iters: int = 50) -> float:
    """Mean wall time of fn() on the current stream, in microseconds (after a warm-up call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def capture(fn) -> torch.cuda.CUDAGraph:
    """Capture fn() into a CUDA graph after a warm-up on a side stream (compiles the kernels)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def lora_inputs(num_tokens, num_slots, rank, slice_offsets, in_features, dtype, seed=0, ranks=None):
    """y, x and a rank pool (`tests.lora_pools`): mixed ranks up to `rank` unless `ranks` is given."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    num_slices, out_features = len(slice_offsets) - 1, slice_offsets[-1]
    y = torch.randn(num_tokens, out_features, generator=gen, device=DEVICE).to(dtype)
    x = torch.randn(num_tokens, in_features, generator=gen, device=DEVICE).to(dtype)
    pool = random_pool(ranks or mixed_ranks(rank, num_slots), rank, num_slices, in_features, out_features, dtype,
                       gen, DEVICE)
    return y, x, *pool


def random_segments(num_tokens: int, max_seg: int, num_slots: int, rng: random.Random):
    seg_lens, seg_slots = [], []
    while sum(seg_lens) < num_tokens:
        seg_lens.append(min(rng.randint(1, max_seg), num_tokens - sum(seg_lens)))
        seg_slots.append(rng.choice([-1, *range(num_slots)]))
    return seg_lens, seg_slots


def random_meta(mode: str, rng: random.Random, num_slots: int, prefill_tokens: int, max_seg: int):
    """Decode: 33 one-token segments of random slots (-1 included); prefill: random segments."""
    if mode == "decode":
        slots = [rng.choice([-1, *range(num_slots)]) for _ in range(33)]
        return decode_lora_meta(torch.tensor(slots, dtype=torch.int32, device=DEVICE))
    return make_lora_meta(*random_segments(prefill_tokens, max_seg, num_slots, rng), DEVICE)


LORA_SHAPES = [
    # (slice_offsets, in_features)
    ((0, 1024), 1024),
    ((0, 2048, 2560, 3072), 2048),  # qkv with GQA: unequal slices
    ((0, 200, 264, 328), 520),  # widths that straddle column tiles
    ((0, 4096), 14336),  # down_proj: long reduction
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("shape", LORA_SHAPES)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_lora_matches_reference(triton_lora, mode, shape, rank, dtype):
    slice_offsets, in_features = shape
    num_slots = 6
    meta = random_meta(mode, random.Random(rank), num_slots, 300, 130)
    num_tokens = meta.token_slots.shape[0]
    y, x, lora_a, lora_b, pool = lora_inputs(num_tokens, num_slots, rank, slice_offsets, in_features, dtype)
    expected, actual = y.clone(), y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    triton_lora.lora_apply_triton(actual, x, lora_a, lora_b, pool, meta, slice_offsets)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("shape", LORA_SHAPES)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_lora_one_token_programs_match_reference(triton_lora, mode, shape, rank, dtype):
    """block_m=1 (a program per token, products summed in registers): the decode variant bench.lora_kernels
    sweeps, on every launch override it tries that changes the kernels' code."""
    slice_offsets, in_features = shape
    num_slots = 6
    meta = random_meta(mode, random.Random(rank + 1), num_slots, 90, 40)
    num_tokens = meta.token_slots.shape[0]
    y, x, lora_a, lora_b, pool = lora_inputs(num_tokens, num_slots, rank, slice_offsets, in_features, dtype)
    expected = y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    atol, rtol = TOLERANCE[dtype]
    one_row = {"block_m": 1, "block_n": 1024, "num_warps": 4 if dtype == torch.bfloat16 else 8}  # LORA_ONE_ROW's
    for shrink, expand in (({"block_m": 1}, {"block_m": 1}), ({"block_m": 1, "block_k": 512, "num_warps": 2},
                                                             {"block_m": 1, "block_n": 512, "num_warps": 8}),
                           ({}, one_row), ({"block_m": 1, "block_n": 16}, {"block_m": 1})):
        actual = y.clone()
        h = triton_lora.lora_shrink(x, lora_a, pool, meta, len(slice_offsets) - 1, tuning=shrink)
        triton_lora.lora_expand(actual, h, lora_b, pool, meta, slice_offsets, tuning=expand)
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("split_k", [1, 4, 16])
def test_lora_shrink_split_k(triton_lora, split_k):
    _, x, lora_a, _, pool = lora_inputs(5, 3, 16, (0, 64, 96, 128), 4096, torch.bfloat16)
    meta = make_lora_meta([2, 3], [2, 0], DEVICE)
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=split_k)
    for t, slot in enumerate(meta.token_slots.tolist()):
        o, r = pool.host_offsets[slot], pool.host_ranks[slot]
        expected = lora_a[3 * o : 3 * (o + r)].float() @ x[t].float()
        torch.testing.assert_close(h[t, : 3 * r], expected, atol=1e-2, rtol=1e-2)


def test_lora_decode_graph_replay(triton_lora):
    """A captured decode step replays correctly after slots and inputs change in place."""
    slice_offsets, num_slots = (0, 512, 640, 768), 4
    y0, x, lora_a, lora_b, pool = lora_inputs(16, num_slots, 16, slice_offsets, 512, torch.bfloat16)
    slots = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    y = y0.clone()
    meta = decode_lora_meta(slots)

    def step():
        y.copy_(y0)
        triton_lora.lora_apply_triton(y, x, lora_a, lora_b, pool, meta, slice_offsets)

    graph = capture(step)
    for seed in range(3):
        slots.copy_(torch.randint(-1, num_slots, (16,), generator=torch.Generator().manual_seed(seed)))
        x.normal_()
        if seed == 2:  # a slot reloaded in place with another rank (the pool's gap units are NaN: use 1 of 16)
            pool.set(0, pool.host_offsets[0], 1)
        graph.replay()
        expected = y0.clone()
        lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
        torch.testing.assert_close(y, expected, atol=6e-2, rtol=3e-2)


def test_lora_prefill_graph_replay(triton_lora):
    """A captured prefill step replays a new segment layout with the same count and max length."""
    slice_offsets = (0, 384)
    y0, x, lora_a, lora_b, pool = lora_inputs(96, 3, 8, slice_offsets, 256, torch.float16)
    meta = make_lora_meta([40, 16, 40], [0, 1, 2], DEVICE)
    y = y0.clone()

    def step():
        y.copy_(y0)
        triton_lora.lora_apply_triton(y, x, lora_a, lora_b, pool, meta, slice_offsets)

    graph = capture(step)
    fresh = make_lora_meta([30, 40, 26], [2, -1, 1], DEVICE)
    meta.seg_starts.copy_(fresh.seg_starts)
    meta.seg_slots.copy_(fresh.seg_slots)
    graph.replay()
    expected = y0.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, fresh, slice_offsets)
    torch.testing.assert_close(y, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("side_expand", [0, 1])
@pytest.mark.parametrize("graph", [False, True])
def test_lora_side_stream_equals_one_stream(triton_lora, graph, side_expand, monkeypatch):
    """linear_with_lora forks the shrink (and, with LORAPLEX_LORA_SIDE_EXPAND, the expand into an fp32 delta) onto a
    side stream beside the base matmul and joins before the expand (the delta's add): the same results as base then
    lora_apply on one stream, eager and replayed from a CUDA graph after x and the slots change in place."""
    from server.kernels.lora import lora_ops
    from server.kernels.lora.lora_ops import linear_with_lora

    monkeypatch.setattr(lora_ops, "SIDE_EXPAND", side_expand)

    slice_offsets, num_slots = (0, 2048, 2560, 3072), 6
    _, x, lora_a, lora_b, pool = lora_inputs(33, num_slots, 16, slice_offsets, 2048, torch.bfloat16)
    base = torch.nn.Linear(2048, 3072, bias=False, device=DEVICE, dtype=torch.bfloat16)
    slots = torch.randint(-1, num_slots, (33,), device=DEVICE, dtype=torch.int32)
    meta = decode_lora_meta(slots)
    out = torch.empty(33, 3072, device=DEVICE, dtype=torch.bfloat16)

    def step():
        out.copy_(linear_with_lora(base, x, lora_a, lora_b, pool, meta, slice_offsets))

    replay = capture(step).replay if graph else step
    for seed in range(3):
        slots.copy_(torch.randint(-1, num_slots, (33,), generator=torch.Generator().manual_seed(seed)))
        x.normal_()
        replay()
        expected = base(x)
        triton_lora.lora_apply_triton(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
        torch.cuda.synchronize()
        # the same kernels on the same inputs: a shrink not waited for would show as garbage, not as rounding
        torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_lora_fused_activation_equals_expand_then_activation(triton_lora, monkeypatch):
    """LORAPLEX_LORA_FUSED_ACT with LORAPLEX_LORA_ONE_ROW: in a captured decode step gate_up's delta is left pending
    (pending_lora.PendingLora) and the activation kernel adds it, bit for bit the one-row expand then silu_mul on the
    same base output and h (the shrink's split-K atomics make h's last bits differ from run to run, so the unfused
    graph is compared within tolerance), replayed after x and the slots change in place (tokens without an adapter
    included)."""
    from server.kernels.glue import glue_ops
    from server.kernels.lora import lora_ops
    from server.kernels.lora.lora_ops import linear_with_lora
    from server.kernels.lora.pending_lora import PendingLora

    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", 1024)
    inter, num_slots, num_tokens = 2816, 6, 32
    slice_offsets = (0, inter, 2 * inter)
    _, x, lora_a, lora_b, pool = lora_inputs(num_tokens, num_slots, 16, slice_offsets, 2048, torch.bfloat16)
    base = torch.nn.Linear(2048, 2 * inter, bias=False, device=DEVICE, dtype=torch.bfloat16)
    slots = torch.zeros(num_tokens, device=DEVICE, dtype=torch.int32)
    meta = decode_lora_meta(slots)
    outs = {fused: torch.empty(num_tokens, inter, device=DEVICE, dtype=torch.bfloat16) for fused in (False, True)}
    gate_ups = {}

    def step(fused):
        monkeypatch.setattr(lora_ops, "FUSED_ACT", fused)
        gate_ups[fused] = linear_with_lora(base, x, lora_a, lora_b, pool, meta, slice_offsets, defer_delta=True)
        outs[fused].copy_(glue_ops.silu_mul(gate_ups[fused]))

    graphs = {fused: capture(lambda fused=fused: step(fused)) for fused in (False, True)}
    pending = gate_ups[True]  # the captured step's tensors, which each replay refills
    assert isinstance(pending, PendingLora) and isinstance(gate_ups[False], torch.Tensor)
    for seed in range(3):
        slots.copy_(torch.randint(-1, num_slots, (num_tokens,), generator=torch.Generator().manual_seed(seed)))
        x.normal_()
        for graph in graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[True], glue_ops.silu_mul(pending.materialize()))
        torch.testing.assert_close(outs[True], outs[False], atol=2e-2, rtol=2e-2)
        expected = base(x)
        lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
        torch.testing.assert_close(outs[True], glue_ops.silu_mul_reference(expected), atol=6e-2, rtol=3e-2)


def paged_inputs(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    max_blocks = max(1, max(-(-n // block_size) for n in context_lens))
    num_blocks = len(context_lens) * max_blocks + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    order = torch.randperm(num_blocks, generator=gen, device=DEVICE)[: len(context_lens) * max_blocks]
    block_tables = order.view(len(context_lens), max_blocks).to(torch.int32)
    q = torch.randn(len(context_lens), num_q_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    context_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, block_tables, context_lens


ATTENTION_CASES = [
    # (context_lens, Hq, Hkv, D, block_size)
    ([1], 8, 8, 64, 16),
    ([1, 0, 17, 4100], 32, 8, 128, 16),
    ([4100], 32, 8, 128, 32),
    ([513, 2, 0, 1000, 31, 32, 33], 16, 4, 64, 32),
    ([5, 4000, 77], 28, 4, 128, 16),  # 7 query heads per kv head
    ([1, 2, 3, 300] * 8, 32, 32, 128, 16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_paged_attention_matches_reference(triton_attention, case, num_splits, dtype):
    lens, num_q_heads, num_kv_heads, head_dim, block_size = case
    inputs = paged_inputs(lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    expected = paged_decode_attention_reference(*inputs, scale)
    actual = triton_attention.paged_decode_attention_triton(*inputs, scale, num_splits=num_splits)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def widened_tables(tables, max_blocks):
    """Block tables max_blocks wide (the engine's are as wide as its longest context allows), the extra columns
    naming block 0: past every row's context, never read."""
    return torch.cat([tables, tables[:, :1].expand(-1, max(0, max_blocks - tables.shape[1]))], 1)


DECODE_TUNINGS = [{}, {"num_stages": 1}, {"num_stages": 2}, {"num_stages": 3},
                  {"tile_n": 32}, {"tile_n": 32, "num_stages": 3}, {"num_warps": 8}]


@pytest.mark.parametrize("tuning", DECODE_TUNINGS, ids=str)
@pytest.mark.parametrize("case", [ATTENTION_CASES[1], ATTENTION_CASES[3], ATTENTION_CASES[5]])
def test_paged_attention_tunings_match_reference(triton_attention, case, tuning):
    """Every launch choice computes the same attention (test_decode_attention_tunings_at_the_engine_shapes times
    them)."""
    lens, num_q_heads, num_kv_heads, head_dim, block_size = case
    inputs = paged_inputs(lens, num_q_heads, num_kv_heads, head_dim, block_size, torch.bfloat16)
    expected = paged_decode_attention_reference(*inputs, head_dim**-0.5)
    for num_splits in (1, 3):
        actual = triton_attention.paged_decode_attention_triton(*inputs, head_dim**-0.5, num_splits=num_splits,
                                                                tuning=tuning)
        torch.testing.assert_close(actual, expected, atol=6e-2, rtol=3e-2)


def graph_time_us(fn, calls: int = 20, replays: int = 20) -> float:
    """GPU time of one fn() from CUDA-graph replays of `calls` calls in a row (no launch overhead)."""
    graph = capture(lambda: [fn() for _ in range(calls)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def test_decode_attention_tunings_at_the_engine_shapes(triton_attention):
    """Each launch choice of decode attention at the 8B engine bench's shapes (Hq 32, Hkv 8, D 128, blocks of 16;
    contexts of 192 as at batch 1, and batch 32; block tables wider than the contexts, as the engine's) computes the
    reference's attention; read with -s for each one's time by graph replay (never asserted)."""
    for lens, max_blocks in (([192], 16), ([192], 256), ([192] * 32, 16), ([1024] * 32, 64), ([4096] * 2, 256)):
        inputs = list(paged_inputs(lens, 32, 8, 128, 16, torch.bfloat16))
        inputs[3] = widened_tables(inputs[3], max_blocks)
        splits = triton_attention.choose_num_splits(len(lens), 8, inputs[3].shape[1], 16)
        attend = triton_attention.paged_decode_attention_triton
        expected = paged_decode_attention_reference(*inputs, 128**-0.5)
        # at batch 32 and context 192 (the 8B engine bench's step), the splits the heuristic does not take too
        for tuning, num_splits in [(t, splits) for t in DECODE_TUNINGS] + [
                ({"num_warps": w}, n) for w in (4, 8) for n in (2, 3) if lens == [192] * 32]:
            got = attend(*inputs, 128**-0.5, num_splits=num_splits, tuning=tuning)
            torch.testing.assert_close(got, expected, atol=6e-2, rtol=3e-2)
            us = graph_time_us(lambda: attend(*inputs, 128**-0.5, num_splits=num_splits, tuning=tuning))  # noqa: B023
            label = f"paged decode B={len(lens)} ctx={lens[0]} table={max_blocks} splits={num_splits} {tuning}"
            print(f"\n{label}: {us:.2f} us")


def test_paged_attention_graph_replay(triton_attention):
    q, k_cache, v_cache, block_tables, context_lens = paged_inputs([64] * 4, 16, 4, 128, 16, torch.bfloat16)
    out = torch.empty_like(q)

    def step():
        attend = triton_attention.paged_decode_attention_triton
        out.copy_(attend(q, k_cache, v_cache, block_tables, context_lens, 0.1))

    graph = capture(step)
    for lens in ([1, 64, 0, 30], [64, 17, 16, 2]):
        context_lens.copy_(torch.tensor(lens))
        q.normal_()
        graph.replay()
        expected = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, 0.1)
        torch.testing.assert_close(out, expected, atol=6e-2, rtol=3e-2)


def test_write_kv_cache_graph_replay():
    k_cache = torch.zeros(8, 16, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(4, 2, 64, device=DEVICE).bfloat16(), torch.randn(4, 2, 64, device=DEVICE).bfloat16()
    slot_mapping = torch.tensor([5, -1, 100, -1], device=DEVICE)
    graph = capture(lambda: write_kv_cache(k, v, k_cache, v_cache, slot_mapping))
    k_cache.zero_()
    graph.replay()
    flat = k_cache.view(-1, 2, 64)
    assert torch.equal(flat[5], k[0]) and torch.equal(flat[100], k[2])
    assert flat.abs().sum(dim=(1, 2)).count_nonzero().item() == 2


def test_decode_shaped_lora_and_attention(triton_lora, triton_attention):
    """The LoRA apply of 32 tokens over 32 adapters and paged decode attention at long contexts compute their
    references; read with -s for their times and effective bandwidth (never asserted)."""
    atol, rtol = TOLERANCE[torch.bfloat16]
    for out_features in (4096, 14336):
        y, x, lora_a, lora_b, pool = lora_inputs(32, 32, 16, (0, out_features), 4096, torch.bfloat16,
                                                 ranks=[16] * 32)
        meta = decode_lora_meta(torch.arange(32, dtype=torch.int32, device=DEVICE))
        expected, actual = y.clone(), y.clone()
        lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, (0, out_features))
        triton_lora.lora_apply_triton(actual, x, lora_a, lora_b, pool, meta, (0, out_features))
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        us = time_us(lambda: triton_lora.lora_apply_triton(y, x, lora_a, lora_b, pool, meta, (0, out_features)))  # noqa: B023
        moved = lora_a.numel() * 2 + lora_b.numel() * 2 + y.numel() * 4 + x.numel() * 2
        label = f"lora decode T=32 slots=32 in=4096 out={out_features} R=16"
        print(f"\n{label}: {us:.1f} us, {moved / us / 1e3:.0f} GB/s")
    for lens in ([1024] * 32, [4096] * 2):
        inputs = paged_inputs(lens, 32, 8, 128, 16, torch.bfloat16)
        torch.testing.assert_close(triton_attention.paged_decode_attention_triton(*inputs, 128**-0.5),
                                   paged_decode_attention_reference(*inputs, 128**-0.5), atol=atol, rtol=rtol)
        us = time_us(lambda: triton_attention.paged_decode_attention_triton(*inputs, 128**-0.5))  # noqa: B023
        moved = sum(lens) * 8 * 128 * 2 * 2
        label = f"paged decode B={len(lens)} ctx={lens[0]} Hq=32 Hkv=8 D=128"
        print(f"\n{label}: {us:.1f} us, {moved / us / 1e3:.0f} GB/s")
