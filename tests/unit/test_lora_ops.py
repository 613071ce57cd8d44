"""Batched multi-adapter LoRA: the torch path (and, opt-in, the Triton kernels) against the plain loop."""

import os
import subprocess
import sys

import pytest
import torch

from server.kernels.lora.lora_ops import (
    SlotLayout,
    decode_lora_meta,
    lora_apply,
    lora_apply_reference,
    lora_apply_torch,
    make_lora_meta,
)
from tests.lora_pools import mixed_ranks, random_pool
from tests.unit.triton_interp import interpreted
from tests.unit.triton_variants import LaunchRecorder

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 3e-2)}

# (segment lengths, segment slots): T = 1, 5, 33 with -1 segments and an empty segment.
LAYOUTS = [
    ([1], [0]),
    ([1], [-1]),
    ([1, 1, 1, 1, 1], [2, -1, 0, 2, 1]),
    ([2, 0, 3], [1, 0, -1]),
    ([10, 1, 22], [0, -1, 2]),
    ([33], [1]),
]
SLICES = [(0, 24), (0, 16, 20, 37)]  # one slice; three of unequal widths


def make_inputs(seg_lens, seg_slots, max_rank, slice_offsets, dtype, num_slots=3, in_features=40, seed=0):
    """Random y, x, pools (`tests.lora_pools`: mixed ranks, NaN outside every slot), layout and meta."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_slices, out_features = sum(seg_lens), len(slice_offsets) - 1, slice_offsets[-1]
    y = torch.randn(num_tokens, out_features, generator=gen).to(dtype)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    lora_a, lora_b, layout = random_pool(mixed_ranks(max_rank, num_slots), max_rank, num_slices, in_features,
                                         out_features, dtype, gen)
    return y, x, lora_a, lora_b, layout, make_lora_meta(seg_lens, seg_slots, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slice_offsets", SLICES)
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_matches_reference(layout, rank, slice_offsets, dtype):
    y, x, lora_a, lora_b, pool, meta = make_inputs(*layout, rank, slice_offsets, dtype)
    expected, actual = y.clone(), y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    lora_apply_torch(actual, x, lora_a, lora_b, pool, meta, slice_offsets)
    assert expected.isfinite().all(), "the reference read a unit no slot owns"
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    for t, slot in enumerate(meta.token_slots.tolist()):
        if slot < 0:
            assert torch.equal(actual[t], y[t]), "a -1 token must keep the base output"


def test_torch_chunks_tokens_like_one_pass(monkeypatch):
    y, x, lora_a, lora_b, pool, meta = make_inputs([10, 1, 22], [0, -1, 2], 8, SLICES[1], torch.float32)
    whole, chunked = y.clone(), y.clone()
    lora_apply_torch(whole, x, lora_a, lora_b, pool, meta, SLICES[1])
    per_token = 8 * (3 * lora_a.shape[1] + lora_b.shape[1])
    monkeypatch.setattr("server.kernels.lora.lora_ops._GATHER_BUDGET", 7 * per_token)
    lora_apply_torch(chunked, x, lora_a, lora_b, pool, meta, SLICES[1])
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_equals_each_slot_alone(dtype):
    seg_lens, seg_slots = [3, 1, 4, 2, 1], [2, -1, 0, 2, 1]
    y, x, lora_a, lora_b, pool, meta = make_inputs(seg_lens, seg_slots, 8, SLICES[1], dtype)
    mixed = y.clone()
    lora_apply(mixed, x, lora_a, lora_b, pool, meta, SLICES[1])
    start = 0
    for n, slot in zip(seg_lens, seg_slots, strict=True):
        alone = y[start : start + n].clone()
        lora_apply(alone, x[start : start + n], lora_a, lora_b, pool, make_lora_meta([n], [slot], "cpu"),
                   SLICES[1])
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(mixed[start : start + n], alone, atol=atol, rtol=rtol)
        start += n


def test_decode_meta_matches_host_meta():
    slots = [3, -1, 0, 0]
    decode = decode_lora_meta(torch.tensor(slots, dtype=torch.int32))
    host = make_lora_meta([1] * len(slots), slots, "cpu")
    for name in ("seg_starts", "seg_slots", "token_slots"):
        assert torch.equal(getattr(decode, name), getattr(host, name)), name
    assert decode.max_seg_len == host.max_seg_len == 1


def test_make_meta_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        make_lora_meta([1, 2], [0], "cpu")


def test_rejects_offsets_not_covering_out():
    y, x, lora_a, lora_b, pool, meta = make_inputs([2], [0], 4, (0, 24), torch.float32)
    with pytest.raises(ValueError):
        lora_apply_torch(y, x, lora_a, lora_b, pool, meta, (0, 20))


def test_layout_refuses_a_rank_above_max_rank():
    pool = SlotLayout.empty(2, 16, "cpu")
    with pytest.raises(ValueError, match="outside 0..16"):
        pool.set(1, 0, 32)
    pool.set(1, 40, 16)
    assert pool.offsets.tolist() == [0, 40] and pool.ranks.tolist() == [0, 16]


@pytest.fixture(scope="module")
def triton_lora():
    return interpreted("server.kernels.lora.triton_lora")


@pytest.fixture(scope="module")
def lora_decode():
    return interpreted("server.kernels.lora.triton_lora_decode")


# The interpreter multiplies bf16 operands of tl.dot as raw uint16 (Triton 3.9), so bf16 is GPU-only.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slice_offsets", SLICES)
@pytest.mark.parametrize(
    "layout, rank",
    [(([1, 1, 1, 1], [2, -1, 0, 2]), 8), (([3, 0, 20, 1], [1, 0, 2, -1]), 16), (([18], [1]), 1)],
)
def test_triton_interpreted_matches_reference(triton_lora, layout, rank, slice_offsets, dtype):
    y, x, lora_a, lora_b, pool, meta = make_inputs(*layout, rank, slice_offsets, dtype, in_features=300)
    expected, actual = y.clone(), y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    triton_lora.lora_apply_triton(actual, x, lora_a, lora_b, pool, meta, slice_offsets)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slice_offsets", SLICES)
@pytest.mark.parametrize("layout", [([1, 1, 1, 1], [2, -1, 0, 2]), ([3, 0, 5, 1], [1, 0, 2, -1])])
def test_triton_interpreted_one_token_programs_match_reference(triton_lora, layout, slice_offsets, dtype):
    """block_m=1 (a program per token, products summed in registers instead of a tensor-core tile): the
    variant bench.lora_kernels measures for decode steps; same results as the reference, segments of any
    length, slices that straddle the expand's column tiles, split or whole K."""
    y, x, lora_a, lora_b, pool, meta = make_inputs(*layout, 8, slice_offsets, dtype, in_features=300)
    expected = y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    num_slices = len(slice_offsets) - 1
    for split_k, block_n in ((1, 64), (3, 64), (1, 16), (3, 16)):  # block_n 16: a slice's columns over programs
        actual = y.clone()
        h = triton_lora.lora_shrink(x, lora_a, pool, meta, num_slices, split_k=split_k,
                                    tuning={"block_m": 1, "block_k": 64, "block_n": block_n})
        triton_lora.lora_expand(actual, h, lora_b, pool, meta, slice_offsets, tuning={"block_m": 1, "block_n": 16})
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slice_offsets", [*SLICES, (0, 300, 600)])
@pytest.mark.parametrize("max_rank", [8, 40])
def test_triton_interpreted_one_row_expand_matches_reference(triton_lora, monkeypatch, slice_offsets, max_rank,
                                                             dtype):
    """LORAPLEX_LORA_ONE_ROW: a decode step's expand takes a program a token over 256 columns, 16 ranks at a time (a
    rank-40 pool: three blocks, the last one masked; the pools hold NaN past each slot's rank), with slices that
    straddle a column block (300 in 0-600); the reference's result within its tolerance."""
    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", 256)
    slots = [2, -1, 0, 2, 1]
    y, x, lora_a, lora_b, pool, _ = make_inputs([1] * len(slots), slots, max_rank, slice_offsets, dtype,
                                                in_features=300)
    meta = decode_lora_meta(torch.tensor(slots, dtype=torch.int32))
    expected, actual = y.clone(), y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    triton_lora.lora_apply_triton(actual, x, lora_a, lora_b, pool, meta, slice_offsets)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    assert torch.equal(actual[1], y[1])  # the token without an adapter


def test_one_row_launch_gives_each_thread_16_bytes_of_columns(triton_lora, monkeypatch):
    """LORAPLEX_LORA_ONE_ROW's launch: N / 256 warps for 2-byte B (N / 128 for fp32), so each thread holds 16 bytes of
    columns with all their ranks; one-token segments take it, longer ones and explicit overrides keep the tile."""
    import inspect

    _, _, _, lora_b, pool, _ = make_inputs([1], [0], 40, SLICES[0], torch.float32)
    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", 0)
    assert triton_lora.one_row_launch(lora_b, pool) is None
    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", 1024)
    assert triton_lora.one_row_launch(lora_b, pool) == (64, 1024, 8)
    assert triton_lora.one_row_launch(lora_b.to(torch.bfloat16), pool) == (64, 1024, 4)
    expand = LaunchRecorder(list(inspect.signature(triton_lora._expand_kernel.fn).parameters))
    monkeypatch.setattr(triton_lora, "_expand_kernel", expand)
    for seg_lens, tuning in (([1, 1], None), ([3], None), ([1, 1], {"block_n": 64})):
        meta = make_lora_meta(seg_lens, [0] * len(seg_lens), "cpu")
        h = torch.zeros(sum(seg_lens), 64)
        triton_lora.lora_expand(torch.zeros(sum(seg_lens), 24), h, lora_b, pool, meta, SLICES[0], tuning=tuning)
    block_m = sorted({dict(v[:5])["BLOCK_M"] for v in expand.variants})
    assert block_m == [1, 16], expand.variants


def _import_with(module: str, name: str, value: str) -> subprocess.CompletedProcess:
    """`import module` in a fresh interpreter with the environment variable `name` set to `value` (settings are
    read at import)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], env={**os.environ, name: value},
                          capture_output=True, text=True)


@pytest.mark.parametrize("value, ok", [("0", True), ("", True), ("1024", True), ("256", True), ("300", False),
                                       ("4096", False), ("128", False), ("on", False)])
def test_one_row_setting_takes_a_power_of_two_from_256_to_2048(value, ok):
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # not imported here: the interpreter tests need it unimported
        pytest.skip("triton is not installed")

    done = _import_with("server.kernels.lora.triton_lora", "LORAPLEX_LORA_ONE_ROW", value)
    assert (done.returncode == 0) == ok, done.stderr
    if not ok:
        assert "LORAPLEX_LORA_ONE_ROW must be 0 or a power of two" in done.stderr


@pytest.mark.parametrize("shrink_tiles", [False, True])
@pytest.mark.parametrize("slice_offsets", SLICES)
def test_triton_interpreted_replay_tiles_match_reference(triton_lora, slice_offsets, shrink_tiles):
    """A tiled replay's segments (cuda_graphs.lora_tiles: chunks of 37 and 5 rows in tiles of 16, then one-row decode
    segments, padded with empty segments of slot -1 to the graph's count) give the reference's result, with the
    shrink a program a token or a tile a program (shrink_tiles)."""
    seg_lens = [16, 16, 5, 5, 1, 1, 1] + [0] * 6
    seg_slots = [2, 2, 2, -1, 0, 2, 1] + [-1] * 6
    y, x, lora_a, lora_b, pool, meta = make_inputs(seg_lens, seg_slots, 8, slice_offsets, torch.float32,
                                                   in_features=300)
    assert meta.max_seg_len == 16
    meta.shrink_tiles = shrink_tiles
    expected, actual = y.clone(), y.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, pool, meta, slice_offsets)
    triton_lora.lora_apply_triton(actual, x, lora_a, lora_b, pool, meta, slice_offsets)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_triton_interpreted_shrink_split_k(triton_lora, split_k):
    _, x, lora_a, _, pool, meta = make_inputs([3, 4], [1, 0], 8, SLICES[1], torch.float32, in_features=300)
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=split_k)
    for t, slot in enumerate(meta.token_slots.tolist()):
        o, r = pool.host_offsets[slot], pool.host_ranks[slot]
        torch.testing.assert_close(h[t, : 3 * r], lora_a[3 * o : 3 * (o + r)] @ x[t], atol=1e-4, rtol=1e-4)


def test_triton_lora_compiles_few_variants_whatever_the_batch(triton_lora, monkeypatch):
    """Each distinct variant is a build (1-2 s on the GPU host, in the step that first meets it). The
    shrink's split-k count follows the number of prompts in a prefill: as a tl.constexpr it made 22 variants
    over 1-64 prompts (the H200 fairness run met prefill steps of 0.1-2.7 s), and as a plain integer
    argument its value class still did (a split of exactly 16 is 'divisible by 16': a 2.2 s step in the
    1,000-adapter load). Now the variants depend only on the segment-length class and on whether the
    shrink splits, for any number of prompts."""
    import inspect

    shrink_params = list(inspect.signature(triton_lora._shrink_kernel.fn).parameters)
    shrink, expand = LaunchRecorder(shrink_params, triton_lora.SHRINK_RUNTIME_INTS), LaunchRecorder()
    monkeypatch.setattr(triton_lora, "_shrink_kernel", shrink)
    monkeypatch.setattr(triton_lora, "_expand_kernel", expand)
    for in_features in (2048, 4096, 8192):  # 8192 with 15 prompts of 128 tokens: a split of exactly 16
        _, x, lora_a, lora_b, pool, _ = make_inputs([4], [0], 16, SLICES[1], torch.float32, in_features=in_features)
        for num_prompts in range(1, 65):
            for seg_len in (1, 20, 128, 200):
                meta = make_lora_meta([seg_len] * num_prompts, [p % 3 for p in range(num_prompts)], "cpu")
                xs = x[:1].expand(seg_len * num_prompts, -1)
                h = triton_lora.lora_shrink(xs, lora_a, pool, meta, 3)
                y = torch.zeros(seg_len * num_prompts, SLICES[1][-1])
                triton_lora.lora_expand(y, h, lora_b, pool, meta, SLICES[1])
    # One per segment-length class (these shapes always split; a batch that does not adds one per class).
    # With split-k specialized by value class it was 6 here, with it a constexpr 22.
    assert len(shrink.variants) <= 3, sorted(shrink.variants)
    assert len(expand.variants) <= 3, sorted(expand.variants)


def test_triton_lora_warm_up_builds_every_variant_a_prefill_meets(triton_lora, monkeypatch):
    """The engine's start-up warm-up (`triton_lora.warm_up`) launches every shrink and expand variant that
    any later batch of prompts can meet on the same linears, so that no serving step builds one (0.3-0.5 s
    each on the H200: the fairness run's first prefill of 14 prompts took 3.3 s building six)."""
    import inspect
    from types import SimpleNamespace

    shrink_params = list(inspect.signature(triton_lora._shrink_kernel.fn).parameters)
    expand_params = list(inspect.signature(triton_lora._expand_kernel.fn).parameters)

    def recorders():
        shrink = LaunchRecorder(shrink_params, triton_lora.SHRINK_RUNTIME_INTS)
        expand = LaunchRecorder(expand_params)
        monkeypatch.setattr(triton_lora, "_shrink_kernel", shrink)
        monkeypatch.setattr(triton_lora, "_expand_kernel", expand)
        return shrink, expand

    linears, layout = [], None
    for slice_offsets, in_features in ((SLICES[1], 2048), (SLICES[0], 2048), (SLICES[0], 8192)):
        _, _, lora_a, lora_b, layout, _ = make_inputs([4], [0], 16, slice_offsets, torch.float32,
                                                      in_features=in_features)
        linears.append(SimpleNamespace(in_features=in_features, slice_offsets=slice_offsets,
                                       lora_a=lora_a, lora_b=lora_b))
    warm_shrink, warm_expand = recorders()
    assert triton_lora.warm_up(linears, layout, torch.device("cpu")) == 3
    served_shrink, served_expand = recorders()
    for linear in linears:
        num_slices = len(linear.slice_offsets) - 1
        for num_prompts in (1, 2, 7, 15, 33, 64, 200):
            for seg_len in (1, 3, 16, 17, 20, 64, 65, 128, 512):
                meta = make_lora_meta([seg_len] * num_prompts, [p % 3 for p in range(num_prompts)], "cpu")
                x = torch.zeros(seg_len * num_prompts, linear.in_features)
                h = triton_lora.lora_shrink(x, linear.lora_a, layout, meta, num_slices)
                y = torch.zeros(seg_len * num_prompts, linear.slice_offsets[-1])
                triton_lora.lora_expand(y, h, linear.lora_b, layout, meta, linear.slice_offsets)
    assert served_shrink.variants <= warm_shrink.variants, served_shrink.variants - warm_shrink.variants
    assert served_expand.variants <= warm_expand.variants, served_expand.variants - warm_expand.variants
    assert {("ATOMIC", True) in v for v in served_shrink.variants} == {True, False}  # both sides of the split


# bf16 slots are GPU-only here: the interpreter rounds float32 -> bf16 toward zero (Triton 3.9), the GPU to
# nearest even, as torch does (tests/gpu/test_adapter_prefetch_gpu.py checks bf16 there).
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scatter_slot_load_fills_the_pools_as_the_per_linear_reference(model_dtype, file_dtype):
    """`triton_slot_load` (one descriptor per tensor, one launch per source dtype, into the flat pool)
    leaves every pool as `LoraLinear.load_slot` does, bit for bit, over a slot that held another adapter
    of a higher rank; the tensors are read from pages as the CPU tier holds them. Fused linears (q|k|v,
    gate|up) with untargeted slices, odd widths."""
    interpreted("server.kernels.lora.triton_slot_load")  # first: Triton must be imported for the interpreter
    from adapters_store import AdapterWeights
    from server.model.lora import LoraLinear, LoraSlots, max_adapter_rank
    from server.pinned_pages import pin_packed

    hidden, inter, kv = 40, 72, 24
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    fused = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]

    class Model:
        dtype, device = model_dtype, torch.device("cpu")

        def __init__(self):
            self.linears = [(layer, LoraLinear(torch.nn.Linear(shapes[p[0]][0], 1), p, [shapes[x][1] for x in p]))
                            for layer in range(2) for p in fused]

        def lora_linears(self):
            return self.linears

    gen = torch.Generator().manual_seed(1)

    def adapter(rank, skip, scaling):
        tensors = {(layer, name): (torch.randn(rank, shapes[name][0], generator=gen).to(file_dtype),
                                   torch.randn(shapes[name][1], rank, generator=gen).to(file_dtype))
                   for layer in range(2) for name in shapes if name not in skip}
        paged = pin_packed(tensors, lambda n: torch.empty(n, dtype=torch.uint8))[0]
        return AdapterWeights(rank=rank, alpha=1.0, use_rslora=False, scaling=scaling, tensors=paged)

    adapters = [(adapter(16, (), 0.37), 16), (adapter(8, ("k_proj", "up_proj"), 0.3), 16), (adapter(4, (), 1.7), 8)]
    pools = []
    for scatter in (True, False):
        model = Model()
        slots = LoraSlots(model, 32, 16, num_slots=3)
        slots.use_scatter = scatter
        for weights, offset in adapters:
            if scatter:
                slots.load(1, offset, weights)
            else:
                for layer, linear in model.lora_linears():
                    linear.load_slot(offset, max_adapter_rank(weights), layer, weights)
        pools.append(slots.flat.clone())
    assert pools[0].abs().sum() > 0
    assert torch.equal(pools[0], pools[1]), int((pools[0] != pools[1]).sum())


@pytest.mark.parametrize("one_row", [0, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slice_offsets", SLICES)
@pytest.mark.parametrize("splits, with_bias", [(1, False), (3, True), (16, True)])
def test_triton_interpreted_expand_sums_equals_sum_then_expand(triton_lora, lora_decode, monkeypatch, slice_offsets,
                                                               dtype, splits, with_bias, one_row):
    """lora_expand_sums (the decode graphs' LoRA linears whose base split K): bit for bit the base's partials
    summed (SplitSums.materialize, csrc's order) and then the expand added into that output, for tokens with and
    without an adapter, in the tile form and the one-row form (LORAPLEX_LORA_ONE_ROW); and within the reference's
    tolerance."""
    from server.kernels.split_sums import SplitSums

    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", one_row)

    gen = torch.Generator().manual_seed(splits)
    slots = [2, -1, 0, 2, 1]
    _, x, lora_a, lora_b, pool, _ = make_inputs([1] * len(slots), slots, 8, slice_offsets, dtype, in_features=300)
    meta = decode_lora_meta(torch.tensor(slots, dtype=torch.int32))
    out_features = slice_offsets[-1]
    partials = torch.randn(splits, len(slots), out_features, generator=gen)
    bias = torch.randn(out_features, generator=gen).to(dtype) if with_bias else None
    sums = SplitSums(partials, bias, dtype)
    num_slices = len(slice_offsets) - 1
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, num_slices)
    got = lora_decode.lora_expand_sums(sums, h, lora_b, pool, meta, slice_offsets)
    expected = sums.materialize()
    triton_lora.lora_expand(expected, h, lora_b, pool, meta, slice_offsets)
    assert got.dtype == dtype and torch.equal(got, expected)
    reference = sums.materialize()
    lora_apply_reference(reference, x, lora_a, lora_b, pool, meta, slice_offsets)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got, reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("one_row", [0, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("max_rank", [8, 40])
@pytest.mark.parametrize("splits, with_bias", [(0, False), (3, True)])
def test_triton_interpreted_activation_adds_a_pending_delta_as_the_expand(triton_lora, lora_decode, monkeypatch,
                                                                          dtype, max_rank, splits, with_bias,
                                                                          one_row):
    """LORAPLEX_LORA_FUSED_ACT: silu_mul given gate_up's output with its LoRA delta pending (pending_lora) gives bit
    for bit the expand (or expand_sums, from split-K partials) then silu_mul, for tokens with and without an
    adapter, ranks up to 40 (three 16-rank blocks) and an intermediate width that is no multiple of the program's
    columns; without LORAPLEX_LORA_ONE_ROW it runs that expand first."""
    from server.kernels.lora.pending_lora import PendingLora
    from server.kernels.split_sums import SplitSums

    glue = interpreted("server.kernels.glue.triton_glue")
    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", one_row)
    gen = torch.Generator().manual_seed(max_rank + splits)
    slots, inter = [2, -1, 0, 2, 1], 300
    slice_offsets = (0, inter, 2 * inter)
    _, x, lora_a, lora_b, pool, _ = make_inputs([1] * len(slots), slots, max_rank, slice_offsets, dtype,
                                                in_features=64, seed=max_rank)
    meta = decode_lora_meta(torch.tensor(slots, dtype=torch.int32))
    if splits:
        bias = torch.randn(2 * inter, generator=gen).to(dtype) if with_bias else None
        base = SplitSums(torch.randn(splits, len(slots), 2 * inter, generator=gen), bias, dtype)
    else:
        base = torch.randn(len(slots), 2 * inter, generator=gen).to(dtype)
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, 2)
    pending = PendingLora(base, h, lora_b, pool, meta, slice_offsets)
    got = glue.silu_mul(pending)
    expanded = pending.materialize()
    assert torch.equal(got, glue.silu_mul(expanded))
    unchanged = base.materialize() if splits else base
    no_adapter = slots.index(-1)
    assert torch.equal(expanded[no_adapter], unchanged[no_adapter])
    assert not torch.equal(expanded[0], unchanged[0]), "the adapter's delta was added"
    reference = unchanged.clone()
    lora_apply_reference(reference, x, lora_a, lora_b, pool, meta, slice_offsets)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(expanded, reference, atol=atol, rtol=rtol)


def test_a_pending_delta_takes_one_token_segments():
    from server.kernels.lora.pending_lora import PendingLora

    _, _, _, lora_b, pool, meta = make_inputs([2, 1], [0, 1], 8, (0, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="one-token segments"):
        PendingLora(torch.zeros(3, 16), torch.zeros(3, 16), lora_b, pool, meta, (0, 8, 16))


def test_expand_sums_refuses_segments_of_several_tokens(triton_lora, lora_decode):
    from server.kernels.split_sums import SplitSums

    _, x, lora_a, lora_b, pool, meta = make_inputs([2, 1], [0, 1], 8, SLICES[0], torch.float32)
    sums = SplitSums(torch.zeros(2, 3, SLICES[0][-1]), None, torch.float32)
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, 1)
    with pytest.raises(ValueError, match="one-token segments"):
        lora_decode.lora_expand_sums(sums, h, lora_b, pool, meta, SLICES[0])


@pytest.mark.parametrize("one_row", [0, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slice_offsets", [SLICES[1], (0, 32, 48)])
@pytest.mark.parametrize("splits, with_bias", [(0, False), (1, False), (3, True), (16, True)])
def test_triton_interpreted_side_delta_equals_the_expand(triton_lora, lora_decode, monkeypatch, slice_offsets, dtype,
                                                         splits, with_bias, one_row):
    """lora_delta then lora_add_delta (LORAPLEX_LORA_SIDE_EXPAND: the delta computed on the side stream, added after
    the base matmul): bit for bit lora_expand into a plain output (splits 0) and lora_expand_sums over split-K
    partials, for tokens with and without an adapter (its delta row -0.0 keeps the base output's bits, a signed zero
    included). Linears of several slices (lora_delta refuses one: the compiled expand folds the base output
    into its dot, which the interpreter does not show; the GPU test compares the compiled kernels). Tile and one-row
    forms (LORAPLEX_LORA_ONE_ROW) alike."""
    from server.kernels.split_sums import SplitSums

    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", one_row)

    gen = torch.Generator().manual_seed(splits + 7)
    slots = [2, -1, 0, 2, 1]
    _, x, lora_a, lora_b, pool, _ = make_inputs([1] * len(slots), slots, 8, slice_offsets, dtype, in_features=300)
    meta = decode_lora_meta(torch.tensor(slots, dtype=torch.int32))
    out_features = slice_offsets[-1]
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, len(slice_offsets) - 1)
    delta = lora_decode.lora_delta(h, lora_b, pool, meta, slice_offsets)
    # the row of the token without an adapter: -0.0, which adds nothing to any value, -0.0 included
    assert torch.all(delta[1] == 0) and torch.all(torch.signbit(delta[1]))
    if splits == 0:
        base = torch.randn(len(slots), out_features, generator=gen).to(dtype)
        base[1, 0] = -0.0  # a sign an added +0.0 would flip
        before = base.clone()
        expected = base.clone()
        triton_lora.lora_expand(expected, h, lora_b, pool, meta, slice_offsets)
        got = lora_decode.lora_add_delta(base, delta, meta)
        assert got.data_ptr() == base.data_ptr()
    else:
        partials = torch.randn(splits, len(slots), out_features, generator=gen)
        bias = torch.randn(out_features, generator=gen).to(dtype) if with_bias else None
        sums = SplitSums(partials, bias, dtype)
        before = sums.materialize()
        expected = lora_decode.lora_expand_sums(sums, h, lora_b, pool, meta, slice_offsets)
        got = lora_decode.lora_add_delta(sums, delta, meta)
    assert got.dtype == dtype and torch.equal(got, expected)
    assert torch.equal(got[1], before[1]) and not torch.equal(got[0], before[0])
    assert torch.signbit(got[1, 0]) == torch.signbit(before[1, 0])


def test_side_delta_refuses_bad_inputs(triton_lora, lora_decode):
    from server.kernels.split_sums import SplitSums

    slices = SLICES[1]
    _, x, lora_a, lora_b, pool, meta = make_inputs([2, 1], [0, 1], 8, slices, torch.float32)
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, 3)
    with pytest.raises(ValueError, match="one-token segments"):
        lora_decode.lora_delta(h, lora_b, pool, meta, slices)
    one_token = decode_lora_meta(torch.tensor([0, 1, -1], dtype=torch.int32))
    _, x1, lora_a1, lora_b1, pool1, _ = make_inputs([1, 1, 1], [0, 1, -1], 8, SLICES[0], torch.float32)
    with pytest.raises(ValueError, match="several slices"):
        lora_decode.lora_delta(triton_lora.lora_shrink(x1, lora_a1, pool1, one_token, 1), lora_b1, pool1, one_token,
                               SLICES[0])
    with pytest.raises(ValueError, match="float32 rows"):
        lora_decode.lora_delta(torch.zeros(3, 24, dtype=torch.float16), lora_b, pool, one_token, slices)
    width = slices[-1]
    y = torch.zeros(3, width)
    for delta in (torch.zeros(3, width, dtype=torch.float16), torch.zeros(2, width), torch.zeros(width, 3).t()):
        with pytest.raises(ValueError, match="delta must be contiguous float32"):
            lora_decode.lora_add_delta(y, delta, one_token)
    with pytest.raises(ValueError, match="contiguous y"):
        lora_decode.lora_add_delta(torch.zeros(width, 3).t(), torch.zeros(3, width), one_token)
    with pytest.raises(ValueError, match="at most 16 split-K partials"):
        lora_decode.lora_add_delta(SplitSums(torch.zeros(17, 3, width), None, torch.float32), torch.zeros(3, width),
                                   one_token)


def test_expand_sums_refuses_partials_that_carry_a_delta(triton_lora, lora_decode):
    """A SplitSums whose delta was computed beside the base (LORAPLEX_LORA_SIDE_EXPAND=2) goes to the kernels that add
    it; the fused sum-expand would drop it."""
    from server.kernels.split_sums import SplitSums

    _, x, lora_a, lora_b, pool, _ = make_inputs([1, 1], [0, 1], 8, SLICES[1], torch.float32)
    meta = decode_lora_meta(torch.tensor([0, 1], dtype=torch.int32))
    width = SLICES[1][-1]
    sums = SplitSums(torch.zeros(2, 2, width), None, torch.float32, torch.zeros(2, width))
    h = triton_lora.lora_shrink(x, lora_a, pool, meta, 3)
    with pytest.raises(ValueError, match="carry one already"):
        lora_decode.lora_expand_sums(sums, h, lora_b, pool, meta, SLICES[1])


@pytest.mark.parametrize("value, ok", [("0", True), ("2", True), ("", True), ("yes", False), ("-1", False)])
def test_side_expand_setting_takes_0_1_or_2(value, ok):
    done = _import_with("server.kernels.lora.lora_ops", "LORAPLEX_LORA_SIDE_EXPAND", value)
    assert (done.returncode == 0) == ok, done.stderr
    if not ok:
        assert "LORAPLEX_LORA_SIDE_EXPAND must be 0, 1 or 2" in done.stderr


def test_shrink_tuning_overrides_take_its_launch_choices_only():
    """LORAPLEX_LORA_SHRINK_TUNING's text: the shrink's launch choices as positive integers, block_k and num_warps
    powers of two; anything else a ValueError naming the setting (triton_lora.shrink_tuning, whose module imports
    Triton: run by make test-triton's phase, here the parser it calls with its names)."""
    from server.kernels.launch_overrides import launch_overrides

    tunable = dict.fromkeys(("block_k", "num_warps", "num_stages", "target_programs"), 0)  # triton_lora's
    parse = lambda text: launch_overrides(text, tunable, "LORAPLEX_LORA_SHRINK_TUNING")  # noqa: E731
    assert parse("block_k=64, num_warps=2,target_programs=264") == {"block_k": 64, "num_warps": 2,
                                                                    "target_programs": 264}
    assert parse("num_stages=3") == {"num_stages": 3}
    for bad in ("block_m=1", "block_k", "block_k=0", "num_warps=two", "num_warps=true", "num_stages=none"):
        with pytest.raises(ValueError, match="LORAPLEX_LORA_SHRINK_TUNING"):
            parse(bad)


def test_decode_tuning_takes_none_where_its_defaults_allow_it_whatever_the_environment_set():
    """num_stages and maxnreg take none even after LORAPLEX_DECODE_TUNING set them to numbers at import."""
    from server.kernels.attention import decode_tuning

    saved = dict(decode_tuning.DECODE_TUNING)
    try:
        decode_tuning.DECODE_TUNING.update(num_stages=3, maxnreg=128)
        assert decode_tuning.tuning_overrides("num_stages=none,maxnreg=none") == {"num_stages": None, "maxnreg": None}
    finally:
        decode_tuning.DECODE_TUNING.clear()
        decode_tuning.DECODE_TUNING.update(saved)


def test_shrink_tuning_takes_powers_of_two_tiles_and_warps(triton_lora):
    assert triton_lora.shrink_tuning("block_k=64,num_warps=2,num_stages=3") == {"block_k": 64, "num_warps": 2,
                                                                         "num_stages": 3}
    assert triton_lora.shrink_tuning("") == {} and triton_lora.SHRINK_TUNING == {}  # CI sets no override
    for bad in ("block_k=96", "num_warps=3", "block_m=16"):
        with pytest.raises(ValueError, match="LORAPLEX_LORA_SHRINK_TUNING"):
            triton_lora.shrink_tuning(bad)
