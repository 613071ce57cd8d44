"""bench.lora_dense: the mixed-adapter LoRA as dense products over the whole pool gives lora_apply_reference's
result (CPU, fp32), whatever the order of the tokens' slots and for one, two and three slices."""

from types import SimpleNamespace

import pytest
import torch

from bench.lora_dense import dense_apply, dense_expand, dense_index, dense_shrink
from server.kernels.lora.lora_meta import SlotLayout, make_lora_meta
from server.kernels.lora.lora_ops import lora_apply_reference


@pytest.mark.parametrize("slice_offsets", [(0, 24), (0, 20, 40), (0, 16, 24, 32)])
def test_dense_products_match_the_reference(slice_offsets):
    gen = torch.Generator().manual_seed(len(slice_offsets))
    num_slots, rank, in_features = 6, 4, 40
    num_slices = len(slice_offsets) - 1
    layout = SlotLayout.from_lists([rank * s for s in range(num_slots)], [rank] * num_slots, rank, "cpu")
    slots = [3, 0, 5, 1, 4, 2]  # one token a slot, not in the pool's order
    meta = make_lora_meta([1] * num_slots, slots, "cpu")
    x = torch.randn(num_slots, in_features, generator=gen)
    lora_a = torch.randn(num_slices * num_slots * rank, in_features, generator=gen)
    lora_b = torch.randn(num_slots * rank, slice_offsets[-1], generator=gen)
    y0 = torch.randn(num_slots, slice_offsets[-1], generator=gen)
    expected, actual = y0.clone(), y0.clone()
    lora_apply_reference(expected, x, lora_a, lora_b, layout, meta, slice_offsets)
    cols, rows = dense_index(layout.offsets, meta.token_slots, num_slices, rank)
    dense_expand(actual, dense_shrink(x, lora_a, cols), lora_b, rows, slice_offsets)
    assert not torch.allclose(expected, y0)  # the adapters add something
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    pools = SimpleNamespace(a=[lora_a], b=[lora_b], layout=layout, num_slices=num_slices, slice_offsets=slice_offsets)
    applied = y0.clone()
    dense_apply(pools, x, meta)(applied)  # the form bench.lora_kernels times and checks
    torch.testing.assert_close(applied, actual)
