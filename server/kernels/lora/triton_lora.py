"""Triton kernels for batched multi-adapter LoRA (SGMV style), semantics of `lora_ops.lora_apply_reference`.

Two launches per call (pool layout: `lora_meta.SlotLayout`; slot s at offset o with rank r):
  shrink: h[t, :n*r] = lora_a[n*o : n*(o+r)] @ x[t]       into an fp32 buffer [T, n * max_rank]
  expand: y[t, lo:hi] += lora_b[o:o+r, lo:hi].T @ h[t, i*r:(i+1)*r]   with slice routing per column
Both grids are (num_segments, cdiv(max_seg_len, BLOCK_M), ...): a program takes BLOCK_M tokens of one
segment, so a prefill segment reuses each A/B tile across its tokens through tl.dot, and a decode step
(segments of one token) still reads each adapter's A and B once per row. Tiles past a segment's end and
segments with slot -1 exit at once, and so do shrink programs past their slot's rank (a rank-8 adapter
reads an eighth of what a rank-64 one does). The shrink splits `in` across programs (atomic adds into a zeroed
buffer) when there are too few segments to fill the GPU. Grids depend only on static shapes and all
metadata is read on device, so both launches can be captured in a CUDA graph. The decode graphs' one-token forms
(the expand fused with the base's split-K sums, the side stream's delta and its add) are in `triton_lora_decode`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from server.kernels import pdl
from server.kernels.launch_overrides import launch_overrides
from server.kernels.lora.lora_meta import LoraBatchMeta, SlotLayout, check_lora_shapes, make_lora_meta
from server.kernels.lora.shrink_workspace import take_zeroed
from server.kernels.triton_pdl import pdl_enter

MAX_SLICES = 4
# Enough programs to keep every SM of an H100 (132 SMs) busy with a few resident programs each.
_TARGET_PROGRAMS = 4 * 132
# The shrink's launch choices for engine A/Bs ("block_k=64,num_warps=2,num_stages=3,target_programs=264"; the sum
# order follows block_k): in the decode graphs the shrinks run beside x-resident base kernels that hold every SM, and
# the forty-eighth session's H200 profile of the 8B mixed32 step gave them 1.77 ms of kernel time a step for ~0.8 GB
# of A (~0.46 TB/s while they overlap), which bench.lora_kernels' sweep, timing them alone, cannot see.
SHRINK_TUNABLE = dict.fromkeys(("block_k", "num_warps", "num_stages", "target_programs"), 0)


def shrink_tuning(text: str) -> dict:
    """LORAPLEX_LORA_SHRINK_TUNING's overrides; block_k and num_warps powers of two (Triton's tiles and warps), so
    that a bad value stops start-up instead of a graph capture."""
    overrides = launch_overrides(text, SHRINK_TUNABLE, "LORAPLEX_LORA_SHRINK_TUNING")
    for name in ("block_k", "num_warps"):
        if name in overrides and overrides[name] & (overrides[name] - 1):
            raise ValueError(f"LORAPLEX_LORA_SHRINK_TUNING: {name} must be a power of two, got {overrides[name]}")
    return overrides


SHRINK_TUNING = shrink_tuning(os.environ.get("LORAPLEX_LORA_SHRINK_TUNING", ""))


# Integer arguments that follow the batch (the prompts of a prefill): Triton would build a variant for each
# of their value classes (== 1, divisible by 16, other), inside the step that first meets it: 1-2 s on the
# H200 (a split-k of exactly 16 stalled a 1,000-adapter load for 2.2 s). A split's length is passed in
# BLOCK_K tiles, so that its start stays a known multiple of BLOCK_K: passed in elements and unspecialized,
# Triton could no longer prove the x and A loads aligned, and the LoRA cost of an 8B batch-32 decode step
# went from 1.4 to 3.3 ms (bench/results/2026-12-02-nvidia-h200-8b.json against 2026-12-01's).
SHRINK_RUNTIME_INTS = ("k_tiles_per_split", "split_k")


@triton.jit(do_not_specialize=SHRINK_RUNTIME_INTS)
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, seg_starts_ptr, seg_slots_ptr, slot_offsets_ptr, slot_ranks_ptr,
    in_features, num_slices, k_tiles_per_split, split_k,
    stride_xm, stride_xk, stride_an, stride_ak, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """A program: BLOCK_M tokens of one segment, BLOCK_N columns of h, one split of `in`. One token a program
    (BLOCK_M 1) sums its products in registers, each k-tile reduced across the lanes that hold it (reducing once
    after the loop instead was measured no faster: bench/NOTES.md, thirty-second session)."""
    pdl_enter(PDL)
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2) // split_k
    pid_k = tl.program_id(2) % split_k
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    row_start = tl.load(seg_starts_ptr + seg) + pid_m * BLOCK_M
    row_end = tl.load(seg_starts_ptr + seg + 1)
    if (slot < 0) | (row_start >= row_end):
        return
    rank = tl.load(slot_ranks_ptr + slot)
    num_cols = num_slices * rank
    if pid_n * BLOCK_N >= num_cols:
        return
    first_row = num_slices * tl.load(slot_offsets_ptr + slot).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < row_end
    col_mask = cols < num_cols
    k_start = pid_k * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + k_tiles_per_split * BLOCK_K, in_features)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + (first_row + cols)[:, None] * stride_an
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_cols + ks[None, :] * stride_ak, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M == 1:  # one token a program: products summed in registers, no tensor-core tile to stage
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            acc += tl.dot(x, tl.trans(a), input_precision=DOT_PRECISION)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if ATOMIC:
        tl.atomic_add(h_ptrs, acc, mask=mask)
    else:
        tl.store(h_ptrs, acc, mask=mask)


@triton.jit
def _row_delta(h_row, b_ptr, first_row, rank, cols, col_mask, bound1, bound2, bound3, stride_br, stride_bn,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SLICES: tl.constexpr):
    """One token's delta [BLOCK_N] at `cols` (h_row: the token's row of h; its slot's B rows from first_row, rank
    `rank`), summed in registers in fp32, 16 ranks at a time: each column takes its slice's h, rounded to B's dtype
    as the tensor-core tile rounds it. A thread holds whole columns when the launch gives it 16 bytes of columns
    (`one_row_launch`), so the rank sum never leaves it."""
    if NUM_SLICES > 1:  # slice index of each column; unused bounds equal out_features
        col_slice = (cols >= bound1).to(tl.int32) + (cols >= bound2).to(tl.int32)
        col_slice += (cols >= bound3).to(tl.int32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, 16):
        rs = r0 + tl.arange(0, 16)
        r_mask = rs < rank
        b = tl.load(b_ptr + (first_row + rs)[None, :] * stride_br + cols[:, None] * stride_bn,
                    mask=col_mask[:, None] & r_mask[None, :], other=0.0)
        h = tl.load(h_row + rs[None, :], mask=r_mask[None, :], other=0.0)
        if NUM_SLICES > 1:
            for i in tl.static_range(1, NUM_SLICES):
                h_i = tl.load(h_row + i * rank + rs[None, :], mask=r_mask[None, :], other=0.0)
                h = tl.where((col_slice == i)[:, None], h_i, h)
        acc += tl.sum(b.to(tl.float32) * h.to(b.dtype).to(tl.float32), axis=1)
    return acc


@triton.jit
def _tile_delta(h_rows, h_mask, b, rs, rank, cols, col_mask, bound1, bound2, bound3, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The deltas [BLOCK_M, BLOCK_N] of a tile of tokens (h_rows [BLOCK_M, 1]: their rows of h; h_mask [BLOCK_M,
    BLOCK_R]: rows in the segment, the slot's rank) at `cols`, from the slot's B tile b [BLOCK_N, BLOCK_R], on
    tensor cores. A tile that straddles a slice boundary takes one masked dot per slice it touches."""
    if NUM_SLICES == 1:
        h = tl.load(h_rows + rs[None, :], mask=h_mask, other=0.0).to(b.dtype)
        return tl.dot(h, tl.trans(b), input_precision=DOT_PRECISION)
    col_slice = (cols >= bound1).to(tl.int32) + (cols >= bound2).to(tl.int32)  # unused bounds equal out_features
    col_slice += (cols >= bound3).to(tl.int32)
    first = tl.min(col_slice, axis=0)
    last = tl.max(tl.where(col_mask, col_slice, 0), axis=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(NUM_SLICES):
        if (first <= i) & (i <= last):
            h = tl.load(h_rows + i * rank + rs[None, :], mask=h_mask, other=0.0).to(b.dtype)
            b_i = tl.where((col_slice == i)[:, None], b, 0.0).to(b.dtype)
            acc += tl.dot(h, tl.trans(b_i), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, y_ptr, seg_starts_ptr, seg_slots_ptr, slot_offsets_ptr, slot_ranks_ptr,
    out_features, bound1, bound2, bound3,
    stride_hm, stride_br, stride_bn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    row_start = tl.load(seg_starts_ptr + seg) + pid_m * BLOCK_M
    row_end = tl.load(seg_starts_ptr + seg + 1)
    if (slot < 0) | (row_start >= row_end):
        return
    rank = tl.load(slot_ranks_ptr + slot)
    first_row = tl.load(slot_offsets_ptr + slot).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < row_end
    col_mask = cols < out_features
    if BLOCK_M == 1:  # one token a program: products summed in registers (`_row_delta`)
        acc = _row_delta(h_ptr + row_start.to(tl.int64) * stride_hm, b_ptr, first_row, rank, cols, col_mask, bound1,
                         bound2, bound3, stride_br, stride_bn, BLOCK_N, BLOCK_R, NUM_SLICES)[None, :]
    else:
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < rank
        b_ptrs = b_ptr + (first_row + rs)[None, :] * stride_br + cols[:, None] * stride_bn
        b = tl.load(b_ptrs, mask=col_mask[:, None] & r_mask[None, :], other=0.0)
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
        h_mask = row_mask[:, None] & r_mask[None, :]
        acc = _tile_delta(h_rows, h_mask, b, rs, rank, cols, col_mask, bound1, bound2, bound3, BLOCK_M, BLOCK_N,
                          NUM_SLICES, DOT_PRECISION)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    y_mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=y_mask)


def _one_row_setting() -> int:
    value = os.environ.get("LORAPLEX_LORA_ONE_ROW", "256") or "0"
    if not value.isdigit() or (int(value) and (int(value) & (int(value) - 1) or not 256 <= int(value) <= 2048)):
        raise ValueError(f"LORAPLEX_LORA_ONE_ROW must be 0 or a power of two from 256 to 2048, got {value!r}")
    return int(value)


# LORAPLEX_LORA_ONE_ROW=N (a power of two, 256-2048, default 256; 0: off): the expands of one-token segments (every
# decode step: `lora_expand`, and `triton_lora_decode`'s fused forms) take one token a program over N columns,
# products summed in registers (`_row_delta`), instead of the token alone in row 0 of a 16-row tensor-core tile. The
# launch gives each thread 16 bytes of columns and all their ranks (N / 256 warps for bf16 B), so the rank sum stays
# within a thread; the tile holds a [16, 256] fp32 accumulator for one live row. The two round differently (a
# thread's fp32 sum against the tensor core's), so every one-token path switches together and compares bit for bit
# among itself. Measured (H100, thirty-first session, bench/results/2026-12-05-nvidia-h100-80gb-hbm3-lora-kernels-
# s31.json, 8B decode of 32 adapters, us, tile / N 256 / 512 / 1024 / 2048): qkv 6.91 / 5.01 / 4.94 / 4.95 / 5.04,
# o 4.62 / 3.75 / 4.02 / 3.98 / 4.24, gate_up 18.67 / 12.78 / 12.90 / 13.06 / 13.42, down 4.62 / 3.88 / 4.02 / 4.04
# / 4.47; the 8B mixed32 decode step (bench.profile_step, wall) 6.36 -> 5.71 ms at N 1024.
ONE_ROW_BLOCK_N = _one_row_setting()

# (LORAPLEX_LORA_B_EARLY, B's lines asked of the L2 before the PDL wait of the kernels that add a one-row delta after
# a base matmul, measured slower on the H200 in the forty-sixth session, was removed; design in 4f37464)


def one_row_launch(lora_b: torch.Tensor, layout: SlotLayout) -> tuple[int, int, int] | None:
    """(block_r, block_n, num_warps) of one-token expand programs under LORAPLEX_LORA_ONE_ROW, None when it is off."""
    if not ONE_ROW_BLOCK_N:
        return None
    columns_a_thread = 16 // lora_b.element_size()
    return _pow2_at_least_16(layout.max_rank), ONE_ROW_BLOCK_N, max(1, ONE_ROW_BLOCK_N // (32 * columns_a_thread))


def one_token_launch(lora_b: torch.Tensor, layout: SlotLayout) -> tuple[int, int, int, int]:
    """(block_m, block_r, block_n, num_warps) of the expand's one-token segments (every decode step): the one-row
    programs under LORAPLEX_LORA_ONE_ROW (block_m 1), else the token alone in a 16-row tile. The decode kernels of
    `triton_lora_decode` launch the same, so that each gives the expand's bits."""
    one_row = one_row_launch(lora_b, layout)
    if one_row:
        return (1, *one_row)
    return 16, _pow2_at_least_16(layout.max_rank), _tile_block_n(16, lora_b, layout), 4


def _tile_block_n(block_m: int, lora_b: torch.Tensor, layout: SlotLayout) -> int:
    """Wide tiles for decode, where B is the only real traffic; capped so a B tile stays <= 16 KB."""
    return min(256, 4096 // block_m, 16384 // lora_b.element_size() // _pow2_at_least_16(layout.max_rank))


def _stages(tuning: dict) -> dict:
    """Triton's num_stages launch option when a sweep sets it (else Triton's default)."""
    return {"num_stages": tuning["num_stages"]} if "num_stages" in tuning else {}


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _block_m(max_seg_len: int) -> int:
    """Tokens per program: 16 (the tl.dot minimum) for decode and short segments, more for prefill."""
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 64 else 64


# Segments up to this many tokens get one shrink program per token (sums in registers, no tensor-core tile to
# stage). H200, rank 16, 4 LoRA linears of a layer (bench/results/2026-12-02-nvidia-h200-lora-kernels.json):
# 8B decode of 32 adapters 36.0 -> 30.3 us of shrink per layer, one adapter's 32 tokens 36.6 -> 21.6; 1B alike.
# The expand's one-token programs did not win (within 3% either way), so it keeps its tiles.
SHRINK_ONE_TOKEN_MAX_SEG = 32


def _shrink_block_m(max_seg_len: int) -> int:
    return 1 if max_seg_len <= SHRINK_ONE_TOKEN_MAX_SEG else _block_m(max_seg_len)


def lora_shrink(x, lora_a, layout: SlotLayout, meta: LoraBatchMeta, num_slices: int,
                split_k: int | None = None, tuning: dict | None = None) -> torch.Tensor:
    """h[t, :n*r] = the token's slot's A @ x[t] in fp32, [T, n * max_rank]; columns past a token's
    n*r, and rows of slot -1, are unspecified. `tuning` overrides the launch choices (bench.lora_kernels'
    sweep): block_m, block_n, block_k, num_warps, num_stages, target_programs."""
    tuning = SHRINK_TUNING if tuning is None else tuning
    num_tokens, in_features = x.shape
    num_cols = num_slices * layout.max_rank
    default_m = _pow2_at_least_16(meta.max_seg_len) if meta.shrink_tiles else _shrink_block_m(meta.max_seg_len)
    block_m = tuning.get("block_m", default_m)
    block_n = tuning.get("block_n", min(64, _pow2_at_least_16(num_cols)))
    block_k = tuning.get("block_k", 64 if block_m >= 64 else 128)
    num_m = triton.cdiv(max(meta.max_seg_len, 1), block_m)
    num_n = triton.cdiv(num_cols, block_n)
    num_k_blocks = triton.cdiv(in_features, block_k)
    if split_k is None:
        base_programs = max(1, meta.num_segments * num_m * num_n)
        target = tuning.get("target_programs", _TARGET_PROGRAMS)
        split_k = max(1, min(num_k_blocks, target // base_programs))
    k_tiles_per_split = triton.cdiv(num_k_blocks, split_k)
    split_k = triton.cdiv(num_k_blocks, k_tiles_per_split)
    h = take_zeroed((num_tokens, num_cols), x.device) if split_k > 1 else None  # a captured step's one fill
    if h is None:
        alloc = torch.empty if split_k == 1 else torch.zeros
        h = alloc((num_tokens, num_cols), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or meta.num_segments == 0:
        return h
    num_warps = tuning.get("num_warps", 4)
    grid = (meta.num_segments, num_m, num_n * split_k)
    _shrink_kernel[grid](
        x, lora_a, h, meta.seg_starts, meta.seg_slots, layout.offsets, layout.ranks,
        in_features, num_slices, k_tiles_per_split, split_k,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=split_k > 1,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps, **_stages(tuning),
        **pdl.triton_launch(x.device, lora=True),
    )  # fmt: skip
    return h


def _slice_bounds(slice_offsets: tuple[int, ...]) -> list[int]:
    """The expand kernels' bound1..bound3: the slices' inner boundaries, unused ones at out_features."""
    num_slices = len(slice_offsets) - 1
    if num_slices > MAX_SLICES:
        raise ValueError(f"at most {MAX_SLICES} slices are supported, got {num_slices}")
    return list(slice_offsets[1:-1]) + [slice_offsets[-1]] * (MAX_SLICES - num_slices)


def lora_expand(y, h, lora_b, layout: SlotLayout, meta: LoraBatchMeta, slice_offsets: tuple[int, ...],
                tuning: dict | None = None) -> None:
    """y[t, lo:hi] += lora_b[o:o+r, lo:hi].T @ h[t, i*r:(i+1)*r] for each slice i, in place. `tuning`
    overrides the launch choices (bench.lora_kernels' sweep): block_n, num_warps, num_stages."""
    tuning = tuning or {}
    num_slices, bounds = len(slice_offsets) - 1, _slice_bounds(slice_offsets)
    num_tokens, out_features = y.shape
    if num_tokens == 0 or out_features == 0 or meta.num_segments == 0:
        return
    if meta.max_seg_len == 1 and not tuning:
        block_m, block_r, block_n, num_warps = one_token_launch(lora_b, layout)
    else:
        block_r = _pow2_at_least_16(layout.max_rank)
        block_m = tuning.get("block_m", _block_m(meta.max_seg_len))
        block_n = tuning.get("block_n", _tile_block_n(block_m, lora_b, layout))
        num_warps = tuning.get("num_warps", 8 if block_m >= 32 else 4)
    num_m = triton.cdiv(max(meta.max_seg_len, 1), block_m)
    grid = (meta.num_segments, num_m, triton.cdiv(out_features, block_n))
    _expand_kernel[grid](
        h, lora_b, y, meta.seg_starts, meta.seg_slots, layout.offsets, layout.ranks,
        out_features, bounds[0], bounds[1], bounds[2],
        h.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, NUM_SLICES=num_slices,
        DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **_stages(tuning), **pdl.triton_launch(y.device, lora=True),
    )  # fmt: skip


def lora_apply_triton(y, x, lora_a, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
                      slice_offsets: tuple[int, ...]) -> None:
    """Triton path of `lora_ops.lora_apply`: shrink into an fp32 buffer, then expand into y."""
    num_slices = check_lora_shapes(y, x, lora_a, lora_b, layout, meta, slice_offsets)
    if lora_b.shape[0] == 0 or layout.num_slots == 0:
        return
    h = lora_shrink(x, lora_a, layout, meta, num_slices)
    lora_expand(y, h, lora_b, layout, meta, slice_offsets)


# One segment length per BLOCK_M class of `_block_m` and `_shrink_block_m` (expand 16, 32, 64 tokens a program;
# shrink 1, 32, 64), and both sides of the shrink's split (the ATOMIC constexpr): with the shapes of each linear,
# these are every variant a prefill can meet. Length 1 is the one-token expand (LORAPLEX_LORA_ONE_ROW's form when it
# is on), 2 the 16-token tile of short segments.
WARM_UP_SEG_LENS = (1, 2, 17, 33, 65)
WARM_UP_SPLITS = (1, 2)


def warm_up(linears, layout: SlotLayout, device: torch.device) -> int:
    """Launch the shrink and expand of each distinct LoRA linear shape once per variant class, on one
    segment of slot -1 (the programs return at once), so that Triton builds each variant (or loads it from
    its disk cache) at start-up instead of inside the first step that meets it: 0.3-0.5 s a variant on the
    H200, where the fairness run's first prefill of 14 prompts took 3.3 s building six. Returns the number
    of distinct shapes warmed."""
    shapes = {}
    for linear in linears:
        key = (linear.in_features, linear.slice_offsets, linear.lora_a.dtype, linear.lora_b.dtype)
        shapes.setdefault(key, linear)
    for (in_features, slice_offsets, _, _), linear in shapes.items():
        num_slices = len(slice_offsets) - 1
        for seg_len in WARM_UP_SEG_LENS:
            meta = make_lora_meta([seg_len], [-1], device)
            x = torch.zeros(seg_len, in_features, dtype=linear.lora_a.dtype, device=device)
            y = torch.zeros(seg_len, slice_offsets[-1], dtype=linear.lora_b.dtype, device=device)
            for split_k in WARM_UP_SPLITS:
                h = lora_shrink(x, linear.lora_a, layout, meta, num_slices, split_k=split_k)
            lora_expand(y, h, linear.lora_b, layout, meta, slice_offsets)
    return len(shapes)
