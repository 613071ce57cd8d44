"""qkv_proj's and gate_up_proj's LoRA shrinks computed by the residual add + norm before them (norm_shrink,
LORAPLEX_LORA_NORM_SHRINK)."""

from types import SimpleNamespace

import pytest
import torch

from server.model.act_shrink import ShrinkAhead
from server.model.lora_meta import decode_lora_meta
from server.model.norm_shrink import shrink_ahead, shrink_reference
from tests.lora_pools import mixed_ranks, random_pool
from tests.unit.triton_interp import interpreted

SLOTS = [2, -1, 0, 2, 1]


def make_shrink(width: int, max_rank: int, num_slices: int, dtype: torch.dtype, seed: int) -> ShrinkAhead:
    """A linear's pool of `num_slices` slices over `width` inputs (NaN outside every slot), the decode metadata of
    SLOTS and a zeroed h."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, _, layout = random_pool(mixed_ranks(max_rank, 3), max_rank, num_slices, width, 24, dtype, gen)
    h = torch.zeros(len(SLOTS), num_slices * max_rank)
    return ShrinkAhead(lora_a, layout, decode_lora_meta(torch.tensor(SLOTS, dtype=torch.int32)), h, num_slices)


def expected_h(x: torch.Tensor, shrink: ShrinkAhead) -> torch.Tensor:
    """The shrink's h at each token's slices x ranks, in float64 (zeros elsewhere)."""
    n, h = shrink.num_slices, torch.zeros_like(shrink.h, dtype=torch.float64)
    offsets, ranks = shrink.layout.offsets.tolist(), shrink.layout.ranks.tolist()
    for t, s in enumerate(SLOTS):
        if s >= 0:
            o, r = offsets[s], ranks[s]
            h[t, : n * r] = shrink.lora_a[n * o : n * (o + r)].double() @ x[t].double()
    return h


def test_shrink_reference_adds_each_tokens_slices_and_ranks_only():
    shrink = make_shrink(width=40, max_rank=8, num_slices=3, dtype=torch.float32, seed=0)
    x = torch.randn(len(SLOTS), 40)
    shrink_reference(x, shrink)
    torch.testing.assert_close(shrink.h, expected_h(x, shrink).float())
    assert shrink.h[SLOTS.index(-1)].eq(0).all() and shrink.h[0].ne(0).any()


@pytest.mark.parametrize("case", ["off", "eager", "prefill", "no lora", "fewer tokens"])
def test_no_step_buffer_where_no_norm_may_take_a_shrink(monkeypatch, case):
    """Off, an eager step (no CUDA graph being captured: the CPU), a prefill, no adapters in the step, or fewer tokens
    than NORM_SHRINK: no StepBuffer, so every linear keeps its own shrink beside its base."""
    from server.model import lora_ops, norm_shrink
    from server.model.lora import LoraContext

    monkeypatch.setattr(norm_shrink, "NORM_SHRINK", {"off": 0, "fewer tokens": len(SLOTS) + 1}.get(case, 1))
    if case != "eager":
        monkeypatch.setattr(norm_shrink.torch.cuda, "is_current_stream_capturing", lambda: True)
        monkeypatch.setattr(lora_ops, "triton_available", lambda: True)
    shrink = make_shrink(width=40, max_rank=8, num_slices=3, dtype=torch.float32, seed=0)
    linear = SimpleNamespace(layout=shrink.layout, slice_names=("q_proj", "k_proj", "v_proj"))
    ctx = SimpleNamespace(is_prefill=case == "prefill", lora=None if case == "no lora" else LoraContext(shrink.meta),
                          memo={})
    layer = SimpleNamespace(self_attn=SimpleNamespace(qkv_proj=linear), mlp=SimpleNamespace(gate_up_proj=linear))
    norm_shrink.begin_step(ctx, [layer, layer], len(SLOTS), torch.device("cpu" if case == "eager" else "cuda"))
    assert ctx.memo == {}
    assert norm_shrink.shrink_ahead(linear, ctx, torch.zeros(len(SLOTS), 40), len(SLOTS)) is None


def step_context(shrink: ShrinkAhead, meta=None, numel: int = 4096):
    """A decode step's context holding a zeroed StepBuffer (already joined: no CUDA stream on the CPU)."""
    from server.model.lora import LoraContext
    from server.model.norm_shrink import StepBuffer

    return SimpleNamespace(is_prefill=False, lora=LoraContext(meta or shrink.meta),
                           memo={"norm_shrink": StepBuffer(torch.zeros(numel), joined=True)})


def test_each_norm_takes_its_own_aligned_zeroed_h_from_the_steps_buffer():
    shrink = make_shrink(width=40, max_rank=8, num_slices=3, dtype=torch.float32, seed=0)
    linear = SimpleNamespace(lora_a=shrink.lora_a, lora_b=torch.zeros(3, 24), layout=shrink.layout,
                             slice_names=("q_proj", "k_proj", "v_proj"))
    ctx = step_context(shrink, numel=256)
    first = shrink_ahead(linear, ctx, torch.zeros(len(SLOTS), 40), len(SLOTS))
    second = shrink_ahead(linear, ctx, torch.zeros(len(SLOTS), 40), len(SLOTS))
    assert first.num_slices == 3 and first.h.shape == (len(SLOTS), 24) and first.h.eq(0).all()
    assert first.h.data_ptr() % 64 == second.h.data_ptr() % 64 and second.h.data_ptr() >= first.h.data_ptr() + 120 * 4
    with pytest.raises(RuntimeError, match="past the step's"):
        shrink_ahead(linear, ctx, torch.zeros(len(SLOTS), 40), len(SLOTS))


@pytest.mark.parametrize("case", ["partials", "several-token segments", "empty pool", "no pool"])
def test_no_shrink_ahead_where_the_linear_keeps_its_own(case):
    """A residual that comes as split-K partials (each chunk of the norm would sum them again), segments of several
    tokens, a pool without adapters, or a linear without a pool: the linear keeps its own shrink."""
    from server.model.lora_meta import make_lora_meta
    from server.model.split_sums import SplitSums

    shrink = make_shrink(width=40, max_rank=8, num_slices=3, dtype=torch.float32, seed=0)
    meta = make_lora_meta([2, 3], [0, 1], "cpu") if case == "several-token segments" else None
    linear = SimpleNamespace(lora_a=None if case == "no pool" else shrink.lora_a,
                             lora_b=torch.zeros(0 if case == "empty pool" else 3, 24), layout=shrink.layout,
                             slice_names=("q_proj", "k_proj", "v_proj"))
    delta = torch.zeros(len(SLOTS), 40)
    if case == "partials":
        delta = SplitSums(torch.zeros(2, len(SLOTS), 40), None, torch.float32)
    assert shrink_ahead(linear, step_context(shrink, meta), delta, len(SLOTS)) is None


@pytest.mark.parametrize("num_slices,max_rank", [(3, 16), (2, 8), (1, 40)])
@pytest.mark.parametrize("width", [4096, 300])
def test_triton_interpreted_norm_adds_the_next_linears_shrink(num_slices, max_rank, width):
    """add_rmsnorm_shrink: the residual sum and the norm bit for bit triton_glue's add_rmsnorm, and h the shrink of
    that norm (fp32, float64's within summation order) at each token's slices x ranks, zeros past them and for a
    token without an adapter; 8B's width in 8 chunks and a width that is no multiple of a chunk, qkv's three slices,
    gate_up's two, and ranks up to 40 (three 16-row blocks)."""
    glue = interpreted("server.model.triton_glue")
    norm_shrink_kernels = interpreted("server.model.triton_norm_shrink")
    gen = torch.Generator().manual_seed(width + num_slices)
    dtype = torch.float16
    h = torch.randn(len(SLOTS), width, generator=gen).to(dtype)
    delta = torch.randn(len(SLOTS), width, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
    shrink = make_shrink(width, max_rank, num_slices, dtype, seed=max_rank)
    want_h, want_y = glue.add_rmsnorm(h, delta, weight, 1e-5)
    got_h, got_y = norm_shrink_kernels.add_rmsnorm_shrink(h, delta, weight, 1e-5, shrink, chunk=128)
    assert torch.equal(got_h, want_h) and torch.equal(got_y, want_y)
    torch.testing.assert_close(shrink.h, expected_h(want_y, shrink).float(), atol=1e-3, rtol=1e-3)
    assert shrink.h[SLOTS.index(-1)].eq(0).all()
    ranks = shrink.layout.ranks.tolist()
    for t, s in enumerate(SLOTS):
        if s >= 0:
            width_t = num_slices * ranks[s]
            assert shrink.h[t, width_t:].eq(0).all() and shrink.h[t, :width_t].ne(0).any()


def test_the_norms_shrink_refuses_what_its_kernel_cannot_take():
    """A delta of another shape, or an h that is not float32 [T, slices x max_rank]: a clear error, not a wrong h."""
    norm_shrink_kernels = interpreted("server.model.triton_norm_shrink")
    shrink = make_shrink(40, 8, 3, torch.float16, seed=1)
    h = torch.randn(len(SLOTS), 40).half()
    with pytest.raises(ValueError, match="plain delta"):
        norm_shrink_kernels.add_rmsnorm_shrink(h, h[:, :20], torch.ones(40).half(), 1e-5, shrink)
    narrow = ShrinkAhead(shrink.lora_a, shrink.layout, shrink.meta, torch.zeros(len(SLOTS), 8), 3)
    with pytest.raises(ValueError, match="slices x rank"):
        norm_shrink_kernels.add_rmsnorm_shrink(h, h.clone(), torch.ones(40).half(), 1e-5, narrow)
