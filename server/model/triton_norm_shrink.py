"""The Triton side of norm_shrink (LORAPLEX_LORA_NORM_SHRINK): the residual add + RMSNorm ahead of a LoRA linear,
which also adds that linear's LoRA shrink of its output into h.

triton_glue's norm takes a row a program (32 programs at batch 32), too few to read 32 adapters' A (8B qkv: 12.6 MB)
at the bandwidth. Here a row takes `chunks` programs: each loads the token's slot's A rows at its chunk's columns
before its programmatic-launch wait (A is the pool's weights, the slots step inputs: no kernel of the step writes
them), so that read overlaps the kernel ahead; then it sums the whole row's squares (triton_glue's _inv_rms and
_normed, over the block and warps of its _add_rmsnorm_kernel: the same bits), stores its chunk of the sum and of the
norm, and adds those A rows times the norm there (fp32, relaxed atomic adds across the row's programs, as the split-K
shrink adds its splits) into h. The row's re-reads come from the L2.

The first form (the fifty-first session: A loaded after the norm, 16 rows and an atomic add at a time) made each
norm the step's slowest glue: 12.7 us for qkv's and 9.5 for gate_up's against the plain norm's 2.2 (H100, 8B,
32 adapters), the base behind it waiting, so the 32-adapter step lost 0.2 ms.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from server.model import pdl
from server.model.triton_glue import _inv_rms, _norm_warps, _normed
from server.model.triton_pdl import pdl_enter

# Columns a program stores and shrinks. 8B qkv at 32 tokens (4096 columns, 48 A rows a token, padded to 64): 16
# programs a row, 512 in all, each holding 64 x 256 of A in registers (128 a thread at 4 warps), so that every
# program fits on the SMs at once (4 an SM) and asks for its A at launch.
CHUNK = int(os.environ.get("LORAPLEX_LORA_NORM_SHRINK_CHUNK", "256"))


@triton.jit
def _add_rmsnorm_shrink_kernel(h_ptr, delta_ptr, weight_ptr, h_out_ptr, y_ptr, n_cols, stride_h, stride_d,
                               stride_ho, stride_y, eps, a_ptr, hl_ptr, token_slots_ptr, slot_offsets_ptr,
                               slot_ranks_ptr, stride_a, stride_hl, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                               BLOCK_R: tl.constexpr, NUM_SLICES: tl.constexpr, PDL: tl.constexpr):
    """Row program_id(0)'s chunk program_id(1): x = h + delta rounded, y = rmsnorm(x) * weight, both stored at the
    chunk's columns; and the token's slot's A rows at those columns times y, summed in fp32, added into the row's h
    (hl). The slot's rows are NUM_SLICES x rank from NUM_SLICES x its offset (the pool's layout), its h columns 0 ..
    NUM_SLICES x rank; a token without an adapter adds nothing."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    slot = tl.load(token_slots_ptr + row).to(tl.int64)
    width = NUM_SLICES * tl.load(slot_ranks_ptr + slot, mask=slot >= 0, other=0)
    first_row = NUM_SLICES * tl.load(slot_offsets_ptr + slot, mask=slot >= 0, other=0).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + (first_row + rs)[:, None] * stride_a + cols[None, :],
                mask=(rs < width)[:, None] & mask[None, :], other=0.0)
    pdl_enter(PDL)
    dtype = h_out_ptr.dtype.element_ty
    every = tl.arange(0, BLOCK)
    whole = every < n_cols
    xs = tl.load(h_ptr + row * stride_h + every, mask=whole, other=0.0)
    xs = (xs.to(tl.float32) + tl.load(delta_ptr + row * stride_d + every, mask=whole, other=0.0).to(tl.float32))
    inv = _inv_rms(xs.to(dtype), n_cols, eps)
    x = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    tl.store(h_out_ptr + row * stride_ho + cols, x, mask=mask)
    y = _normed(x, inv, w, y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=mask)
    tl.atomic_add(hl_ptr + row * stride_hl + rs, tl.sum(a.to(tl.float32) * y.to(tl.float32)[None, :], axis=1),
                  mask=rs < width, sem="relaxed")


def add_rmsnorm_shrink(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, shrink,
                       chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rmsnorm(h + delta)) for h, delta [T, N] (rows contiguous), the same bits as triton_glue's
    add_rmsnorm; and the next linear's shrink of the norm added into shrink.h (act_shrink.ShrinkAhead, zeroed,
    [T, num_slices * max_rank] float32)."""
    num_rows, n_cols = h.shape
    lora_a, hl, layout = shrink.lora_a, shrink.h, shrink.layout
    if delta.shape != h.shape or delta.stride(1) != 1 or h.stride(1) != 1:
        raise ValueError("the norm's shrink takes h and a plain delta of its shape, rows contiguous")
    if (lora_a.stride(1) != 1 or lora_a.shape[1] != n_cols or hl.dtype != torch.float32
            or hl.shape != (num_rows, shrink.num_slices * layout.max_rank)):
        raise ValueError("the shrink's A must have contiguous rows of the norm's width, h float32 [T, slices x rank]")
    y = torch.empty_like(h)
    h_out = torch.empty_like(h)
    if num_rows == 0:
        return h_out, y
    block_r = max(16, triton.next_power_of_2(shrink.num_slices * layout.max_rank))
    _add_rmsnorm_shrink_kernel[(num_rows, triton.cdiv(n_cols, chunk))](
        h, delta, weight, h_out, y, n_cols, h.stride(0), delta.stride(0), h_out.stride(0), y.stride(0), eps,
        lora_a, hl, shrink.meta.token_slots, layout.offsets, layout.ranks, lora_a.stride(0), hl.stride(0),
        BLOCK=triton.next_power_of_2(n_cols), CHUNK=chunk, BLOCK_R=block_r, NUM_SLICES=shrink.num_slices,
        num_warps=_norm_warps(n_cols), **pdl.triton_launch(h.device),  # the plain norm's: the same sum
    )  # fmt: skip
    return h_out, y
