"""Triton paged decode attention (semantics of `attention_ops.paged_decode_attention_reference`).

One program per (row, kv head, split) loads each K/V tile of its row once for the whole group of query
heads that share the kv head (the group is padded to BLOCK_H >= 16 rows for tl.dot) and runs an online
softmax over that row's real blocks only, so cost follows each row's context length. With NUM_SPLITS > 1
(flash-decoding) a row's blocks are cut into NUM_SPLITS contiguous ranges whose partial results a second
kernel merges; this fills the GPU when batch * kv heads is small and contexts are long. Grids depend on
static shapes only (max_blocks, not the real lengths), so both kernels can be captured in a CUDA graph.

rotary_decode_attention_triton runs the same kernel on the qkv projection's output row instead of q: each program
rotates its q heads, and the one that holds the row's last position rotates the new k and stores k and v in the
cache before it reads them back, which takes the rotary kernel's launch off every layer of a decode step.

Why not FlashInfer's decode kernel (measured, fifty-fifth session, bench.flashinfer_decode, H100, 8B shape, 32 rows,
us): its CUDA-core paged batch decode (0.7.2.post1) took 15.31 against this kernel's 12.27 at 192 positions and
125.48 against 94.16 at 2,048, where this one reads K and V at 94% of the card's copy bandwidth
(bench/results/2026-12-08-nvidia-h100-80gb-hbm3-flashinfer-decode-s55.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels import pdl
from server.kernels.attention.decode_tuning import DECODE_TUNING, choose_num_splits
from server.kernels.attention.triton_paged_cache import _tile_ptrs
from server.kernels.glue.triton_glue import COMPILED_SPLITS, MAX_SPLITS, _delta, _rotated, _source, _summed
from server.kernels.split_sums import SplitSums
from server.kernels.triton_pdl import pdl_enter

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_bt", "plane", "splits"])  # the block-table width follows the contexts
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, acc_ptr, stats_ptr,
    src_ptr, bias_ptr, rope_ptr, slot_ptr, plane, splits, delta_ptr,
    qk_scale, group,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ob, stride_oh, stride_src, stride_rope,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, ROTARY: tl.constexpr,
    SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr, MOST_SPLITS: tl.constexpr,
    FRESH_KV: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """With ROTARY, q and the row's new k and v come from the qkv projection's output row at src_ptr (or, with SUMS,
    from its split-K partials, plus its LoRA delta with HAS_DELTA): q is rotated here, and the program whose split
    holds the row's last position rotates k and stores k and v in the cache before it reads its tiles. With FRESH_KV
    (ROTARY only) no tile reads a written row's last position back: the last split computes and stores the new k and
    v after its tiles and takes them from registers (`_fresh_kv_added`), so the tiles' loads wait only for q."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + row)
    cached = context_len  # the positions the tiles read from the cache: with FRESH_KV all but a written row's last
    if ROTARY and FRESH_KV:  # compile-time
        fresh = tl.load(slot_ptr + row) >= 0  # a row that writes no k and v reads them all from the cache
        cached = context_len - fresh.to(tl.int32)
    num_tiles = tl.cdiv(cached, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    heads = kv_head * group + tl.arange(0, BLOCK_H)
    head_mask = tl.arange(0, BLOCK_H) < group
    dims = tl.arange(0, HEAD_DIM)
    # Only now wait for the kernel ahead. What was read above is none of its output: the lengths (and, with FRESH_KV,
    # the slots) are the step's inputs, written before the step's first kernel, so these loads overlap its last blocks.
    pdl_enter(PDL)
    if ROTARY:
        writes_kv = split == (tl.maximum(num_tiles, 1) - 1) // tl.maximum(tiles_per_split, 1)
        if FRESH_KV:
            writes_kv = split < 0  # none here: the last split stores them after its tiles
        q = _rotated_q(src_ptr, bias_ptr, rope_ptr, slot_ptr, k_ptr, v_ptr, row, kv_head, heads, head_mask, plane,
                       splits, stride_src, stride_rope, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                       stride_vh, tl.num_programs(1) * group, tl.num_programs(1),
                       writes_kv, delta_ptr, out_ptr.dtype.element_ty, HEAD_DIM, BLOCK_SIZE, BLOCK_H, SUMS, HAS_BIAS,
                       HAS_DELTA, MOST_SPLITS)
    else:
        q_ptrs = q_ptr + row.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=head_mask[:, None], other=0.0)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_DIM), dtype=tl.float32)
    for tile in range(tile_start, tile_end):
        k_ptrs, v_ptrs, is_valid = _tile_ptrs(block_tables_ptr, row, stride_bt, tile, cached, k_ptr, v_ptr, kv_head,
                                              dims, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                              TILE_N, BLOCK_SIZE)
        k = tl.load(k_ptrs, mask=is_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=is_valid[:, None], other=0.0)  # beside K's, before the dot that waits for K
        m_i, l_i, acc = _attended(q, k, v, is_valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    if ROTARY and FRESH_KV:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split == NUM_SPLITS - 1:  # the row's new k and v after the tiles (their loads wait for none of it)
            k_new, v_new = _new_kv(src_ptr, bias_ptr, rope_ptr, slot_ptr, k_ptr, v_ptr, row, kv_head, plane, splits,
                                   stride_src, stride_rope, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, tl.num_programs(1) * group, tl.num_programs(1), delta_ptr,
                                   out_ptr.dtype.element_ty, HEAD_DIM, BLOCK_SIZE, SUMS, HAS_BIAS, HAS_DELTA,
                                   MOST_SPLITS)
            if fresh:  # the row's last position, from registers
                m_i, l_i, acc = _fresh_kv_added(q, k_new, v_new, m_i, l_i, acc, qk_scale, k_ptr.dtype.element_ty,
                                                v_ptr.dtype.element_ty)

    if NUM_SPLITS == 1:
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        out_ptrs = out_ptr + row.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        # Partials laid out [B, Hq, NUM_SPLITS, ...]: acc unnormalised, stats = (max, sum of exp).
        part = (row.to(tl.int64) * tl.num_programs(1) * group + heads) * NUM_SPLITS + split
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask[:, None])
        tl.store(stats_ptr + part * 2, m_i, mask=head_mask)
        tl.store(stats_ptr + part * 2 + 1, l_i, mask=head_mask)


@triton.jit
def _attended(q, k, v, is_valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """The online softmax's state (m_i, l_i, acc) after one tile of positions (k, v [TILE_N, HEAD_DIM]; the invalid
    ones weigh nothing)."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, TILE_N]
    scores = tl.where(is_valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _rotated_q(src_ptr, bias_ptr, rope_ptr, slot_ptr, kc_ptr, vc_ptr, row, kv_head, heads, head_mask, plane, splits,
               stride_src, stride_rope, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
               num_q_heads, num_kv_heads, writes_kv, delta_ptr, dtype: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, SUMS: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_DELTA: tl.constexpr, MOST_SPLITS: tl.constexpr):
    """The group's rotated q heads [BLOCK_H, HEAD_DIM] from the qkv row (columns q | k | v, heads of HEAD_DIM);
    with `writes_kv`, also the row's new k (rotated) and v stored at its cache slot (`_new_kv`; none when the slot is
    -1), followed by a barrier, so that this program's tiles read them back."""
    HALF: tl.constexpr = HEAD_DIM // 2
    half = tl.arange(0, HALF)
    rope = rope_ptr + row.to(tl.int64) * stride_rope  # [2, D]: cos row, then sin row
    cos_lo, cos_hi = tl.load(rope + half), tl.load(rope + HALF + half)
    sin_lo, sin_hi = tl.load(rope + 2 * HALF + half), tl.load(rope + 3 * HALF + half)
    src_row = row.to(tl.int64) * stride_src
    q_cols = heads[:, None] * HEAD_DIM + half[None, :]
    q_lo, q_hi = _qkv_halves(src_ptr, bias_ptr, src_row, q_cols, head_mask[:, None], plane, splits, delta_ptr, dtype,
                             HALF, SUMS, HAS_BIAS, HAS_DELTA, MOST_SPLITS)
    q_lo, q_hi = _rotated(q_lo, q_hi, cos_lo[None, :], cos_hi[None, :], sin_lo[None, :], sin_hi[None, :], dtype)
    if writes_kv:
        _new_kv(src_ptr, bias_ptr, rope_ptr, slot_ptr, kc_ptr, vc_ptr, row, kv_head, plane, splits, stride_src,
                stride_rope, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, num_q_heads,
                num_kv_heads, delta_ptr, dtype, HEAD_DIM, BLOCK_SIZE, SUMS, HAS_BIAS, HAS_DELTA, MOST_SPLITS)
        tl.debug_barrier()  # the stores above are seen by every thread of this program's tile loads
    # q's halves side by side again: [BLOCK_H, HALF, 2] -> [BLOCK_H, 2, HALF] -> [BLOCK_H, HEAD_DIM]
    return tl.permute(tl.join(q_lo, q_hi), (0, 2, 1)).reshape(BLOCK_H, HEAD_DIM)


@triton.jit
def _new_kv(src_ptr, bias_ptr, rope_ptr, slot_ptr, kc_ptr, vc_ptr, row, kv_head, plane, splits, stride_src,
              stride_rope, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, num_q_heads, num_kv_heads,
              delta_ptr, dtype: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SUMS: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr, MOST_SPLITS: tl.constexpr):
    """The row's new k (rotated) and v of this kv head [HEAD_DIM] each, stored at the row's cache slot (none when the
    slot is -1), with no barrier (`_rotated_q` puts one after it where its tiles read them back)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    half = tl.arange(0, HALF)
    rope = rope_ptr + row.to(tl.int64) * stride_rope
    cos_lo, cos_hi = tl.load(rope + half), tl.load(rope + HALF + half)
    sin_lo, sin_hi = tl.load(rope + 2 * HALF + half), tl.load(rope + 3 * HALF + half)
    src_row = row.to(tl.int64) * stride_src
    whole = half < HALF
    k_cols = (num_q_heads + kv_head) * HEAD_DIM + half
    k_lo, k_hi = _qkv_halves(src_ptr, bias_ptr, src_row, k_cols, whole, plane, splits, delta_ptr, dtype, HALF, SUMS,
                             HAS_BIAS, HAS_DELTA, MOST_SPLITS)
    k_lo, k_hi = _rotated(k_lo, k_hi, cos_lo, cos_hi, sin_lo, sin_hi, dtype)
    v_lo, v_hi = _qkv_halves(src_ptr, bias_ptr, src_row, k_cols + num_kv_heads * HEAD_DIM, whole, plane, splits,
                             delta_ptr, dtype, HALF, SUMS, HAS_BIAS, HAS_DELTA, MOST_SPLITS)
    slot = tl.load(slot_ptr + row)
    if slot >= 0:
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_at = kc_ptr + block * stride_kb + offset * stride_kt + kv_head * stride_kh + half
        v_at = vc_ptr + block * stride_vb + offset * stride_vt + kv_head * stride_vh + half
        tl.store(k_at, k_lo.to(kc_ptr.dtype.element_ty))
        tl.store(k_at + HALF, k_hi.to(kc_ptr.dtype.element_ty))
        tl.store(v_at, v_lo.to(vc_ptr.dtype.element_ty))
        tl.store(v_at + HALF, v_hi.to(vc_ptr.dtype.element_ty))
    # halves side by side: [HALF, 2] -> [2, HALF] -> [HEAD_DIM]
    k_new = tl.permute(tl.join(k_lo, k_hi), (1, 0)).reshape(HEAD_DIM)
    v_new = tl.permute(tl.join(v_lo, v_hi), (1, 0)).reshape(HEAD_DIM)
    return k_new, v_new


@triton.jit
def _fresh_kv_added(q, k_new, v_new, m_i, l_i, acc, qk_scale, k_dtype: tl.constexpr, v_dtype: tl.constexpr):
    """The online softmax's state (m_i, l_i, acc) after one more position whose k and v are k_new and v_new: as the
    tiles take a position, its k and v as the cache holds them, its weight rounded to v's dtype before it scales v."""
    k = k_new.to(k_dtype).to(tl.float32)
    score = tl.sum(q.to(tl.float32) * k[None, :], axis=1) * qk_scale  # [BLOCK_H]
    m_new = tl.maximum(m_i, score)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(score - m_new)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p.to(v_dtype).to(tl.float32)[:, None] * v_new.to(v_dtype).to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def _qkv_halves(src_ptr, bias_ptr, src_row, cols, mask, plane, splits, delta_ptr, dtype: tl.constexpr,
                HALF: tl.constexpr, SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr,
                MOST_SPLITS: tl.constexpr):
    """The qkv output's values at `cols` and `cols + HALF` of one row (src_row: the row's offset), in `dtype`:
    loaded, or summed from the split-K partials (plus the LoRA delta, with HAS_DELTA), at most MOST_SPLITS of them
    (the launch's count compiled in, or the most any linear splits into: triton_glue._summed)."""
    if SUMS:
        lo = _summed(src_ptr, src_row + cols, mask, plane, splits, bias_ptr, cols, dtype, HAS_BIAS, MOST_SPLITS,
                     delta_ptr, HAS_DELTA)
        hi = _summed(src_ptr, src_row + cols + HALF, mask, plane, splits, bias_ptr, cols + HALF, dtype, HAS_BIAS,
                     MOST_SPLITS, delta_ptr, HAS_DELTA)
    else:
        lo = tl.load(src_ptr + src_row + cols, mask=mask, other=0.0)
        hi = tl.load(src_ptr + src_row + cols + HALF, mask=mask, other=0.0)
    return lo, hi


@triton.jit
def _merge_splits_kernel(
    acc_ptr, stats_ptr, out_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < NUM_SPLITS
    part = (row.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + splits
    m = tl.load(stats_ptr + part * 2, mask=split_mask, other=float("-inf"))
    l = tl.load(stats_ptr + part * 2 + 1, mask=split_mask, other=0.0)  # noqa: E741
    m_max = tl.maximum(tl.max(m, axis=0), -1e30)  # finite even when every split is empty
    weight = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(weight * l, axis=0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_mask[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.maximum(total, 1e-30)
    out = tl.where(total > 0, out, 0.0)
    out_ptrs = out_ptr + row.to(tl.int64) * stride_ob + head * stride_oh + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))


def _check_shapes(num_q_heads: int, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if head_dim not in (64, 128) or block_size not in (16, 32):
        raise ValueError(f"head_dim {head_dim} / block_size {block_size} not supported (64|128, 16|32)")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the caches must be contiguous along head_dim")


def paged_decode_attention_triton(
    q, k_cache, v_cache, block_tables, context_lens, scale: float, num_splits: int | None = None,
    tuning: dict | None = None,
):
    """Triton decode attention; q [B, Hq, D], caches [num_blocks, block_size, Hkv, D] -> [B, Hq, D].
    `tuning` overrides DECODE_TUNING's entries."""
    _check_shapes(q.shape[1], q.shape[2], k_cache, v_cache)
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous along head_dim")
    out = torch.empty_like(q)
    _launch(out, q, None, k_cache, v_cache, block_tables, context_lens, scale, num_splits, tuning)
    return out


def rotary_decode_attention_triton(
    qkv: torch.Tensor | SplitSums, num_q_heads: int, rope, k_cache, v_cache, slot_mapping, block_tables,
    context_lens, scale: float, num_splits: int | None = None, tuning: dict | None = None,
):
    """glue_ops.qkv_rotary_write_kv, then paged_decode_attention_triton, in one kernel: qkv [B, (Hq + 2 Hkv) D]
    (rows contiguous) or its split-K partials, rope [B, 2, D] float32, slot_mapping [B] int64 (-1: no write);
    returns the attention [B, Hq, D]. Only for steps whose rows read no other row's new k and v (one decode token
    a row): a program stores its row's k and v and reads them back, with no order against other rows' programs."""
    head_dim, num_kv_heads = k_cache.shape[3], k_cache.shape[2]
    _check_shapes(num_q_heads, head_dim, k_cache, v_cache)
    num_rows, width = qkv.shape
    if width != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv width {width} is not ({num_q_heads} + 2 x {num_kv_heads}) x {head_dim}")
    if isinstance(qkv, torch.Tensor) and qkv.stride(1) != 1:
        raise ValueError("qkv's rows must be contiguous")
    out = torch.empty((num_rows, num_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    rotary = (*_source(qkv, takes_delta=True), rope.contiguous(), slot_mapping, *_delta(qkv))
    _launch(out, None, rotary, k_cache, v_cache, block_tables, context_lens, scale, num_splits, tuning)
    return out


def _launch(out, q, rotary, k_cache, v_cache, block_tables, context_lens, scale, num_splits, tuning) -> None:
    """The decode kernel (and, with splits, the merge kernel) into out [B, Hq, D]: q read from
    `q`, or, with `rotary` = (source, plane, splits, bias, has_bias, rope, slot_mapping, delta, has_delta), from the
    qkv output."""
    tuning = {**DECODE_TUNING, **(tuning or {})}
    num_rows, num_q_heads, head_dim = out.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(num_rows, num_kv_heads, block_tables.shape[1], block_size)
    if num_rows == 0:
        return
    if num_splits > 1:
        acc = torch.empty((num_rows, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=out.device)
        stats = torch.empty((num_rows, num_q_heads, num_splits, 2), dtype=torch.float32, device=out.device)
    else:
        acc = stats = out  # unused
    if rotary is None:
        src, plane, splits, bias, has_bias, rope, slots, delta, has_delta = q, 0, 0, q, False, q, context_lens, q, False
        stride_q = (q.stride(0), q.stride(1))
    else:
        src, plane, splits, bias, has_bias, rope, slots, delta, has_delta = rotary
        q, stride_q = out, (0, 0)  # unused
    _decode_kernel[(num_rows, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, acc, stats,
        src, bias, rope, slots, plane, splits, delta,
        scale * _LOG2E, group,
        *stride_q, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), src.stride(-2), rope.stride(0),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_H=max(16, triton.next_power_of_2(group)),
        TILE_N=tuning["tile_n"], NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if out.dtype == torch.float32 else "tf32", ROTARY=rotary is not None,
        SUMS=plane > 0, HAS_BIAS=has_bias, HAS_DELTA=has_delta, num_warps=tuning["num_warps"],
        MOST_SPLITS=splits if plane > 0 and COMPILED_SPLITS else MAX_SPLITS,
        FRESH_KV=tuning["fresh_kv"] and rotary is not None,
        **({} if tuning["num_stages"] is None else {"num_stages": tuning["num_stages"]}),
        **({} if tuning["maxnreg"] is None else {"maxnreg": tuning["maxnreg"]}),
        **pdl.triton_launch(out.device),
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_rows, num_q_heads)](
            acc, stats, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            **pdl.triton_launch(out.device),
        )  # fmt: skip
