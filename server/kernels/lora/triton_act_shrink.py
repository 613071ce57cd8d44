"""The Triton side of act_shrink (LORAPLEX_LORA_SILU_SHRINK): down_proj's LoRA shrink added by the activation kernel
(triton_glue._silu_mul_kernel's SHRINK)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_added(v, row, cols, mask, a_ptr, h_ptr, token_slots_ptr, slot_offsets_ptr, slot_ranks_ptr, stride_an,
                  stride_hm, BLOCK_R: tl.constexpr):
    """Add the token's slot's A rows at `cols` times v (the row's rounded activation there), summed in fp32, into
    its row of h (act_shrink: down_proj's shrink, one slice): 16 ranks at a time, atomic adds across a row's
    programs as the split-K shrink adds its splits. A token without an adapter adds nothing."""
    slot = tl.load(token_slots_ptr + row).to(tl.int64)
    if slot >= 0:
        rank = tl.load(slot_ranks_ptr + slot)
        first_row = tl.load(slot_offsets_ptr + slot).to(tl.int64)
        v32 = v.to(tl.float32)
        for r0 in tl.static_range(0, BLOCK_R, 16):
            rs = r0 + tl.arange(0, 16)
            r_mask = rs < rank
            a = tl.load(a_ptr + (first_row + rs)[:, None] * stride_an + cols[None, :],
                        mask=r_mask[:, None] & mask[None, :], other=0.0)
            tl.atomic_add(h_ptr + row * stride_hm + rs, tl.sum(a.to(tl.float32) * v32[None, :], axis=1), mask=r_mask)


def silu_shrink_args(shrink, out: torch.Tensor) -> tuple[tuple, int]:
    """(a2, h2, token slots, slot offsets, slot ranks, a2's and h2's row strides) and BLOCK_R2 of silu_mul's shrink
    (act_shrink.ShrinkAhead), or stand-ins never read."""
    if shrink is None:
        return (out,) * 5 + (0, 0), 16
    a, h, layout = shrink.lora_a, shrink.h, shrink.layout
    if a.stride(1) != 1 or a.shape[1] != out.shape[1] or h.dtype != torch.float32 or h.shape[0] != out.shape[0]:
        raise ValueError("the shrink's A must have contiguous rows of the activation's width, h float32 of its rows")
    block_r = max(16, triton.next_power_of_2(layout.max_rank))
    return (a, h, shrink.meta.token_slots, layout.offsets, layout.ranks, a.stride(0), h.stride(0)), block_r
