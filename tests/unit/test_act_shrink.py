"""down_proj's LoRA shrink computed by the activation kernel (act_shrink, LORAPLEX_LORA_SILU_SHRINK)."""

import pytest
import torch

from server.kernels.lora.act_shrink import ShrinkAhead, shrink_ahead, shrink_reference
from server.kernels.lora.lora_meta import decode_lora_meta
from tests.lora_pools import mixed_ranks, random_pool
from tests.unit.triton_interp import interpreted

SLOTS = [2, -1, 0, 2, 1]


def make_shrink(inter: int, max_rank: int, dtype: torch.dtype, seed: int) -> ShrinkAhead:
    """down's pool (one slice, NaN outside every slot), the decode metadata of SLOTS and a zeroed h."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, _, layout = random_pool(mixed_ranks(max_rank, 3), max_rank, 1, inter, 24, dtype, gen)
    h = torch.zeros(len(SLOTS), max_rank)
    return ShrinkAhead(lora_a, layout, decode_lora_meta(torch.tensor(SLOTS, dtype=torch.int32)), h)


def expected_h(act: torch.Tensor, shrink: ShrinkAhead) -> torch.Tensor:
    """The shrink's h at each token's ranks, by the plain loop (zeros elsewhere)."""
    h = torch.zeros_like(shrink.h)
    offsets, ranks = shrink.layout.offsets.tolist(), shrink.layout.ranks.tolist()
    for t, s in enumerate(SLOTS):
        if s >= 0:
            o, r = offsets[s], ranks[s]
            h[t, :r] = shrink.lora_a[o : o + r].double() @ act[t].double()
    return h


def test_shrink_reference_adds_each_tokens_ranks_only():
    shrink = make_shrink(inter=40, max_rank=8, dtype=torch.float32, seed=0)
    act = torch.randn(len(SLOTS), 40)
    shrink_reference(act, shrink)
    want = expected_h(act, shrink)
    torch.testing.assert_close(shrink.h, want.float())
    assert shrink.h[SLOTS.index(-1)].eq(0).all() and shrink.h[0].ne(0).any()


def test_no_shrink_ahead_outside_a_captured_decode_step(monkeypatch):
    """Off, or on with no CUDA graph being captured (an eager step, the CPU), down_proj keeps its own shrink."""
    from server.kernels.lora import act_shrink
    from server.model.lora import LoraContext

    shrink = make_shrink(inter=40, max_rank=8, dtype=torch.float32, seed=0)
    down = type("Down", (), {"lora_a": shrink.lora_a, "lora_b": torch.zeros(3, 24), "layout": shrink.layout,
                             "slice_names": ("down_proj",)})()
    lora = LoraContext(shrink.meta)
    monkeypatch.setattr(act_shrink, "SILU_SHRINK", 0)
    assert shrink_ahead(down, lora, len(SLOTS), torch.device("cpu")) is None
    monkeypatch.setattr(act_shrink, "SILU_SHRINK", 1)
    assert shrink_ahead(down, lora, len(SLOTS), torch.device("cpu")) is None
    assert shrink_ahead(down, None, len(SLOTS), torch.device("cpu")) is None


@pytest.mark.parametrize("case", ["two slices", "several-token segments", "empty pool", "fewer tokens"])
def test_no_shrink_ahead_where_down_proj_would_not_take_it(monkeypatch, case):
    """In a captured CUDA step (stood in for here), a down_proj of several slices, a batch whose segments are not one
    token each, or a pool without adapters keeps its own shrink: the conditions linear_with_lora's fork takes; and
    so does a step of fewer tokens than SILU_SHRINK (one token by default, where the separate shrink was faster)."""
    from server.kernels.lora import act_shrink, lora_ops
    from server.kernels.lora.lora_meta import make_lora_meta
    from server.model.lora import LoraContext

    monkeypatch.setattr(act_shrink, "SILU_SHRINK", len(SLOTS) + 1 if case == "fewer tokens" else 1)
    monkeypatch.setattr(act_shrink.torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(lora_ops, "triton_available", lambda: True)
    shrink = make_shrink(inter=40, max_rank=8, dtype=torch.float32, seed=0)
    meta = shrink.meta if case != "several-token segments" else make_lora_meta([2, 3], [0, 1], "cpu")
    slices = ("gate_proj", "up_proj") if case == "two slices" else ("down_proj",)
    lora_b = torch.zeros(0 if case == "empty pool" else 3, 24)
    down = type("Down", (), {"lora_a": shrink.lora_a, "lora_b": lora_b, "layout": shrink.layout,
                             "slice_names": slices})()
    assert shrink_ahead(down, LoraContext(meta), len(SLOTS), torch.device("cuda")) is None


@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("max_rank", [8, 40])
@pytest.mark.parametrize("splits", [0, 3])
def test_triton_interpreted_activation_adds_down_shrink(monkeypatch, max_rank, splits, pending):
    """silu_mul with a ShrinkAhead: the activation's bits unchanged, and h the shrink of that activation (fp32, the
    plain loop's within summation order) at each token's ranks, zeros past them and for a token without an
    adapter; ranks up to 40 (three 16-rank blocks), an intermediate width that is no multiple of the program's
    columns, from split-K partials and with gate_up's own LoRA delta pending (LORAPLEX_LORA_ONE_ROW)."""
    from server.kernels.lora.pending_lora import PendingLora
    from server.kernels.split_sums import SplitSums

    glue = interpreted("server.kernels.glue.triton_glue")
    triton_lora = interpreted("server.kernels.lora.triton_lora")
    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", 256)
    gen = torch.Generator().manual_seed(max_rank + splits)
    inter, dtype = 300, torch.float16
    if splits:
        gate_up = SplitSums(torch.randn(splits, len(SLOTS), 2 * inter, generator=gen), None, dtype)
    else:
        gate_up = torch.randn(len(SLOTS), 2 * inter, generator=gen).to(dtype)
    if pending:
        x = torch.randn(len(SLOTS), 64, generator=gen).to(dtype)
        up_a, up_b, up_layout = random_pool(mixed_ranks(16, 3), 16, 2, 64, 2 * inter, dtype, gen)
        meta = decode_lora_meta(torch.tensor(SLOTS, dtype=torch.int32))
        h_up = triton_lora.lora_shrink(x, up_a, up_layout, meta, 2)
        gate_up = PendingLora(gate_up, h_up, up_b, up_layout, meta, (0, inter, 2 * inter))
    shrink = make_shrink(inter, max_rank, dtype, seed=max_rank)
    plain = glue.silu_mul(gate_up)
    act = glue.silu_mul(gate_up, shrink=shrink)
    assert torch.equal(act, plain)
    torch.testing.assert_close(shrink.h, expected_h(act, shrink).float(), atol=1e-4, rtol=1e-4)
    assert shrink.h[SLOTS.index(-1)].eq(0).all()
    ranks = shrink.layout.ranks.tolist()
    for t, s in enumerate(SLOTS):
        if s >= 0:
            assert shrink.h[t, ranks[s]:].eq(0).all() and shrink.h[t, : ranks[s]].ne(0).any()
