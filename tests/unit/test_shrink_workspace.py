"""The decode graphs' one zeroed buffer for the split-K LoRA shrinks (server/kernels/lora/shrink_workspace.py)."""

import pytest
import torch

from server.kernels.lora.shrink_workspace import ShrinkWorkspace, take_zeroed
from tests.unit.test_lora_ops import SLICES, make_inputs
from tests.unit.triton_interp import interpreted


@pytest.fixture(scope="module")
def triton_lora():
    return interpreted("server.kernels.lora.triton_lora")


def test_sizing_records_and_serving_hands_out_zeroed_aligned_slices_in_order():
    workspace = ShrinkWorkspace()
    assert take_zeroed((2, 3), torch.device("cpu")) is None  # none active: the caller allocates
    with workspace.sizing():
        assert take_zeroed((2, 3), torch.device("cpu")) is None
        assert take_zeroed((4, 8), torch.device("cpu")) is None
    assert workspace.needed == 16 + 32  # each rounded up to 16 elements (64 bytes)
    with workspace.serving("cpu"):
        first = take_zeroed((2, 3), torch.device("cpu"))
        second = take_zeroed((4, 8), torch.device("cpu"))
        assert first.shape == (2, 3) and second.shape == (4, 8)
        assert first.data_ptr() == workspace.buffer.data_ptr()
        assert second.data_ptr() == workspace.buffer.data_ptr() + 16 * 4
        assert not first.any() and not second.any()
    assert take_zeroed((2, 3), torch.device("cpu")) is None  # deactivated on exit


def test_a_captured_forward_may_take_less_than_the_sized_one_never_more():
    """down_proj's shrink, which the warm-up forward runs, is the activation's in the captured one (act_shrink): the
    capture takes less, and its slices stay within the zeroed buffer; a capture that asks for more is refused."""
    workspace = ShrinkWorkspace()
    with workspace.sizing():
        take_zeroed((2, 3), torch.device("cpu"))
        take_zeroed((4, 8), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="past the workspace"), workspace.serving("cpu"):
        take_zeroed((4, 8), torch.device("cpu"))
        take_zeroed((4, 8), torch.device("cpu"))
    with workspace.serving("cpu"):
        only = take_zeroed((4, 8), torch.device("cpu"))  # the first shrink's work went elsewhere
        assert only.data_ptr() == workspace.buffer.data_ptr() and not only.any()


def test_interpreted_shrink_takes_its_slice_and_sums_into_zeros(triton_lora):
    """A split-K shrink under a serving workspace adds into its slice, which the serving zeroed; whole-K shrinks
    store into their own h and take nothing."""
    _, x, lora_a, _, pool, meta = make_inputs([3, 4], [1, 0], 8, SLICES[1], torch.float32, in_features=300)
    expected = triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=3)
    workspace = ShrinkWorkspace()
    with workspace.sizing():
        triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=3)
        triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=1)
    assert workspace.needed == 7 * 3 * 8 + 8  # [7 tokens, 3 slices x max rank 8], rounded to 16 elements
    with workspace.serving("cpu"):
        h = triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=3)
        assert h.data_ptr() == workspace.buffer.data_ptr()
        whole = triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=1)
        assert whole.untyped_storage().data_ptr() != workspace.buffer.untyped_storage().data_ptr()
        with pytest.raises(RuntimeError, match="past the workspace"):
            triton_lora.lora_shrink(x, lora_a, pool, meta, 3, split_k=3)
    for t, slot in enumerate(meta.token_slots.tolist()):
        r = pool.host_ranks[slot]
        torch.testing.assert_close(h[t, : 3 * r], expected[t, : 3 * r], atol=1e-5, rtol=1e-5)
