"""Triton kernels of a decode step's LoRA linears, whose segments are one token each (semantics of
`lora_ops.lora_apply_reference`; the shrink and the segment-general expand are in `triton_lora`):

  lora_expand_sums: the base's split-K partials summed and rounded, plus each token's delta, in one launch
  lora_delta:       each token's delta alone in fp32, for the side stream (lora_ops.SIDE_EXPAND)
  lora_add_delta:   that delta added after the base matmul (summing its partials first, if any)

A token's delta is computed as `triton_lora._expand_kernel` computes it for a one-token segment (the token alone in
row 0 of a 16-row tensor-core tile, or under LORAPLEX_LORA_ONE_ROW one row summed in a thread's registers), so each
path gives the expand's bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels import pdl
from server.kernels.glue.triton_glue import _MAX_SPLITS, MAX_SPLITS, _source, _summed, check_delta
from server.kernels.lora.lora_meta import LoraBatchMeta, SlotLayout
from server.kernels.lora.triton_lora import _row_delta, _slice_bounds, _tile_delta, one_token_launch
from server.kernels.split_sums import SplitSums
from server.kernels.triton_pdl import pdl_enter


@triton.jit
def _token_delta_tile(h_ptr, row, stride_hm, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, cols, col_mask, bound1,
                      bound2, bound3, stride_br, stride_bn, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One token's delta at `cols` from its slot's (>= 0) B tile, as the expand computes it for a decode step's
    one-token segment: the token alone in row 0 of a [16, BLOCK_N] tensor-core tile (16 is the tl.dot minimum; the
    other rows are masked to zero). Returns the whole tile, so that callers add and store it as the expand does (row
    0 only), with no reduction to pick the row out."""
    rank = tl.load(slot_ranks_ptr + slot)
    first_row = tl.load(slot_offsets_ptr + slot).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < rank
    b = tl.load(b_ptr + (first_row + rs)[None, :] * stride_br + cols[:, None] * stride_bn,
                mask=col_mask[:, None] & r_mask[None, :], other=0.0)
    tile_rows = tl.arange(0, 16)
    h_rows = h_ptr + row * stride_hm + 0 * tile_rows[:, None]
    h_mask = (tile_rows == 0)[:, None] & r_mask[None, :]
    return _tile_delta(h_rows, h_mask, b, rs, rank, cols, col_mask, bound1, bound2, bound3, 16, BLOCK_N, NUM_SLICES,
                       DOT_PRECISION)


@triton.jit
def _token_delta_row(h_ptr, row, stride_hm, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, cols, col_mask, bound1,
                     bound2, bound3, stride_br, stride_bn, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     NUM_SLICES: tl.constexpr):
    """One token's delta [BLOCK_N] at `cols` from its slot's (>= 0) B, as the expand's one-token programs compute it
    (`triton_lora._row_delta`, LORAPLEX_LORA_ONE_ROW)."""
    rank = tl.load(slot_ranks_ptr + slot)
    first_row = tl.load(slot_offsets_ptr + slot).to(tl.int64)
    return _row_delta(h_ptr + row * stride_hm, b_ptr, first_row, rank, cols, col_mask, bound1, bound2, bound3,
                      stride_br, stride_bn, BLOCK_N, BLOCK_R, NUM_SLICES)


@triton.jit
def _store_token_row(row_ptr, tile, cols, col_mask):
    """Row 0 of a [16, BLOCK_N] tile (`_token_delta_tile`'s shape) at `cols` of the row at row_ptr: stored as the
    expand stores a one-token segment's tile, with no reduction to pick the row out."""
    tile_rows = tl.arange(0, 16)
    tl.store(row_ptr + cols[None, :] + 0 * tile_rows[:, None], tile, mask=(tile_rows == 0)[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["plane", "splits"])
def _expand_sums_kernel(
    src_ptr, bias_ptr, plane, splits, h_ptr, b_ptr, y_ptr, token_slots_ptr, slot_offsets_ptr, slot_ranks_ptr,
    out_features, bound1, bound2, bound3, stride_hm, stride_br, stride_bn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SLICES: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_ROW: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token a program: the base's output at these columns summed from its split-K partials and rounded (as
    csrc's sum kernel does), then, for a token with an adapter, plus its delta (`_token_delta_tile`, or with
    ONE_ROW `_token_delta_row`) and rounded again, stored into y [T, out] (contiguous): bit for bit the sum kernel,
    then `_expand_kernel`."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features
    out = _summed(src_ptr, row * out_features + cols, col_mask, plane, splits, bias_ptr, cols,
                  y_ptr.dtype.element_ty, HAS_BIAS)
    slot = tl.load(token_slots_ptr + row).to(tl.int64)
    if ONE_ROW:
        if slot >= 0:
            acc = _token_delta_row(h_ptr, row, stride_hm, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, cols,
                                   col_mask, bound1, bound2, bound3, stride_br, stride_bn, BLOCK_N, BLOCK_R, NUM_SLICES)
            out = (out.to(tl.float32) + acc).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * out_features + cols, out, mask=col_mask)
    elif slot >= 0:
        acc = _token_delta_tile(h_ptr, row, stride_hm, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, cols, col_mask,
                                bound1, bound2, bound3, stride_br, stride_bn, BLOCK_N, BLOCK_R, NUM_SLICES,
                                DOT_PRECISION)
        _store_token_row(y_ptr + row * out_features, (out.to(tl.float32)[None, :] + acc).to(y_ptr.dtype.element_ty),
                         cols, col_mask)
    else:
        tl.store(y_ptr + row * out_features + cols, out, mask=col_mask)


@triton.jit
def _lora_delta_kernel(
    h_ptr, b_ptr, delta_ptr, token_slots_ptr, slot_offsets_ptr, slot_ranks_ptr,
    out_features, bound1, bound2, bound3, stride_hm, stride_br, stride_bn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ONE_ROW: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token a program: its delta at these columns (`_token_delta_tile`, or with ONE_ROW `_token_delta_row`), in
    fp32 into delta [T, out] (contiguous); a token without an adapter stores -0.0, which adds nothing to any value
    (signed zeros included)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(token_slots_ptr + row).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features
    if slot < 0:
        tl.store(delta_ptr + row * out_features + cols, tl.full((BLOCK_N,), -0.0, tl.float32), mask=col_mask)
        return
    if ONE_ROW:
        acc = _token_delta_row(h_ptr, row, stride_hm, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, cols, col_mask,
                               bound1, bound2, bound3, stride_br, stride_bn, BLOCK_N, BLOCK_R, NUM_SLICES)
        tl.store(delta_ptr + row * out_features + cols, acc, mask=col_mask)
    else:
        acc = _token_delta_tile(h_ptr, row, stride_hm, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, cols, col_mask,
                                bound1, bound2, bound3, stride_br, stride_bn, BLOCK_N, BLOCK_R, NUM_SLICES,
                                DOT_PRECISION)
        _store_token_row(delta_ptr + row * out_features, acc, cols, col_mask)


@triton.jit(do_not_specialize=["plane", "splits"])
def _lora_add_delta_kernel(
    src_ptr, bias_ptr, plane, splits, delta_ptr, y_ptr, out_features,
    BLOCK_N: tl.constexpr, SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token a program: the base's output at these columns (SUMS: summed from its split-K partials and rounded,
    as `_summed`; else read from y), plus the token's fp32 delta, rounded, stored into y [T, out] (contiguous; in
    place without SUMS): the same additions and roundings as `_expand_sums_kernel` and `_expand_kernel` on the same
    delta (tokens without an adapter add -0.0: their output's bits stay)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features
    offs = row * out_features + cols
    if SUMS:
        out = _summed(src_ptr, offs, col_mask, plane, splits, bias_ptr, cols, y_ptr.dtype.element_ty, HAS_BIAS,
                      _MAX_SPLITS, delta_ptr, True)
    else:
        y = tl.load(y_ptr + offs, mask=col_mask, other=0.0)
        delta = tl.load(delta_ptr + offs, mask=col_mask, other=0.0)
        out = (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, out, mask=col_mask)


def _check_one_token_segments(meta: LoraBatchMeta, num_tokens: int, what: str) -> None:
    if not meta.one_token_segments(num_tokens):
        raise ValueError(f"{what} takes one-token segments (a decode step's metadata)")


def _one_token_launch(lora_b, layout: SlotLayout) -> tuple[int, int, int, bool]:
    """(block_r, block_n, num_warps, one_row) of the one-token delta programs: lora_expand's for one-token segments
    (`triton_lora.one_token_launch`: the same programs, the same bits)."""
    block_m, block_r, block_n, num_warps = one_token_launch(lora_b, layout)
    return block_r, block_n, num_warps, block_m == 1


def lora_expand_sums(sums: SplitSums, h, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
                     slice_offsets: tuple[int, ...]) -> torch.Tensor:
    """A new y [T, out]: the base's output summed from its split-K partials `sums`, plus each token's delta, in one
    launch: bit for bit `lora_expand` into `sums.materialize()`. The segments must be one token each, in token order
    (a decode step's `decode_lora_meta`)."""
    num_slices, bounds = len(slice_offsets) - 1, _slice_bounds(slice_offsets)
    num_tokens, out_features = sums.shape
    _check_one_token_segments(meta, num_tokens, "lora_expand_sums")
    if sums.delta is not None:
        raise ValueError("lora_expand_sums adds its own delta: the partials carry one already")
    if sums.partials.shape[0] > MAX_SPLITS:
        raise ValueError(f"at most {MAX_SPLITS} split-K partials are summed here, got {sums.partials.shape[0]}")
    y = torch.empty(num_tokens, out_features, dtype=sums.dtype, device=sums.device)
    if num_tokens == 0 or out_features == 0:
        return y
    partials = sums.partials
    block_r, block_n, num_warps, one_row = _one_token_launch(lora_b, layout)
    _expand_sums_kernel[(num_tokens, triton.cdiv(out_features, block_n))](
        partials, sums.bias if sums.bias is not None else partials, partials[0].numel(), partials.shape[0],
        h, lora_b, y, meta.token_slots, layout.offsets, layout.ranks,
        out_features, bounds[0], bounds[1], bounds[2], h.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r, NUM_SLICES=num_slices, HAS_BIAS=sums.bias is not None,
        DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32", ONE_ROW=one_row, num_warps=num_warps,
        **pdl.triton_launch(y.device, lora=True),
    )  # fmt: skip
    return y


def lora_delta(h, lora_b, layout: SlotLayout, meta: LoraBatchMeta, slice_offsets: tuple[int, ...]) -> torch.Tensor:
    """Each token's delta [T, out] in fp32, computed as `lora_expand` computes it for one-token segments (the
    decode graphs' side stream runs this beside the base matmul; `lora_add_delta`, or the glue kernel that sums the
    base's partials, adds it). Rows of tokens without an adapter hold -0.0.

    Linears of several slices only (qkv, gate_up). With one slice, Triton folds the add of the base output into
    the expand's tensor-core dot (its accumulator starts from y: `add(dot(h, b, 0), y)` becomes `dot(h, b, y)`, seen
    in the sm_90 TTIR of `_expand_kernel` and `_expand_sums_kernel`), which rounds differently from a dot then an
    add; with several slices the dot's value leaves a branch and the add stays an add, in the expand as here."""
    num_slices, bounds = len(slice_offsets) - 1, _slice_bounds(slice_offsets)
    num_tokens, out_features = h.shape[0], slice_offsets[-1]
    if num_slices < 2:
        raise ValueError("lora_delta takes linears of several slices (one slice: lora_expand / lora_expand_sums)")
    if h.dtype != torch.float32 or h.stride(1) != 1:
        raise ValueError(f"h must be the shrink's float32 rows, got {h.dtype} with strides {h.stride()}")
    _check_one_token_segments(meta, num_tokens, "lora_delta")
    delta = torch.empty(num_tokens, out_features, dtype=torch.float32, device=h.device)
    if num_tokens == 0 or out_features == 0:
        return delta
    block_r, block_n, num_warps, one_row = _one_token_launch(lora_b, layout)
    _lora_delta_kernel[(num_tokens, triton.cdiv(out_features, block_n))](
        h, lora_b, delta, meta.token_slots, layout.offsets, layout.ranks,
        out_features, bounds[0], bounds[1], bounds[2], h.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r, NUM_SLICES=num_slices,
        DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32", ONE_ROW=one_row, num_warps=num_warps,
        **pdl.triton_launch(delta.device, lora=True),
    )  # fmt: skip
    return delta


ADD_DELTA_BLOCK_N = 256  # elements a program of the join (the glue kernels' best launch shape; not swept here)


def lora_add_delta(y: torch.Tensor | SplitSums, delta: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """y plus `lora_delta`'s output: a plain y [T, out] (contiguous) in place, or a new one summed from split-K
    partials. Bit for bit `lora_expand` (or `lora_expand_sums`) on the h the delta came
    from (lora_delta's linears of several slices; the GPU test checks it on the sm_90 build)."""
    num_tokens, out_features = y.shape
    _check_one_token_segments(meta, num_tokens, "lora_add_delta")
    check_delta(delta, y)
    sums = isinstance(y, SplitSums)
    if sums:
        src, plane, splits, bias, has_bias = _source(y)
        out = torch.empty(num_tokens, out_features, dtype=y.dtype, device=y.device)
    else:
        if not y.is_contiguous():
            raise ValueError("lora_add_delta adds into a contiguous y")
        src, plane, splits, bias, has_bias, out = y, 0, 0, y, False, y
    if num_tokens == 0 or out_features == 0:
        return out
    _lora_add_delta_kernel[(num_tokens, triton.cdiv(out_features, ADD_DELTA_BLOCK_N))](
        src, bias, plane, splits, delta, out, out_features,
        BLOCK_N=ADD_DELTA_BLOCK_N, SUMS=sums, HAS_BIAS=has_bias, num_warps=4,
        **pdl.triton_launch(out.device, lora=True),
    )  # fmt: skip
    return out
