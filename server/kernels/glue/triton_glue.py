"""Fused decoder-layer glue in Triton; semantics in server.kernels.glue.glue_ops (one kernel per op, no host
syncs, static shapes: graph-capturable once compiled). silu_mul and qkv_rotary_write_kv also take their input as
unsummed split-K partials (server.kernels.split_sums) and sum them as they load it."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from server.kernels import pdl
from server.kernels.lora.pending_lora import PendingLora
from server.kernels.lora.triton_act_shrink import _shrink_added, silu_shrink_args
from server.kernels.lora.triton_lora import _row_delta, one_row_launch
from server.kernels.split_sums import SplitSums
from server.kernels.triton_pdl import pdl_enter

# The most split-K partials a kernel here sums: cuda_nf4.pick_split_k's largest split (csrc's kUnrolledSplits).
MAX_SPLITS = 16
_MAX_SPLITS = tl.constexpr(MAX_SPLITS)  # compiled kernels read only constexpr globals
# silu_mul's split count compiled in (one build a count; the default) or read at run time, 16 masked loads an element
# (LORAPLEX_GLUE_COMPILED_SPLITS=0). H200 (bench/results/2026-12-04-nvidia-h200-glue-kernels-s26.json, us, gate_up's
# partials, run time against compiled in): 1B 16 rows 2.61 vs 2.20 (8 splits), 32 rows 2.86 vs 2.00 (3), 64 rows
# 4.33 vs 2.28 (2); 8B 16 rows 3.36 vs 2.97 (8). No other launch shape beat 256 elements and 4 warps a program. The
# decode attention's q, k and v from qkv's partials likewise (triton_attention; since the forty-third session, not yet
# timed on its own: the same sums, so the same bits, in one build a count).
COMPILED_SPLITS = os.environ.get("LORAPLEX_GLUE_COMPILED_SPLITS", "1") == "1"


@triton.jit
def _summed(src_ptr, offs, mask, plane, splits, bias_ptr, bias_offs, dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
            MOST_SPLITS: tl.constexpr = _MAX_SPLITS, delta_ptr=None, HAS_DELTA: tl.constexpr = False):
    """A linear's output at `offs` (offsets of any shape into one [M, N] plane) from its split-K partials: summed
    from 0 in split order, plus the bias, rounded once to `dtype`, as csrc/nf4_device.cuh's split_k_sum_kernel does. The
    loads of every split up to MOST_SPLITS are issued together (unused ones masked): the most any consumer sums, or
    a caller's split count compiled in (silu_mul), one load a split. With HAS_DELTA, plus the fp32 delta at the same
    offsets (a contiguous [M, N]) and rounded again, as the LoRA expand adds its delta (SplitSums.delta)."""
    total = tl.zeros(offs.shape, dtype=tl.float32)
    for s in tl.static_range(MOST_SPLITS):  # the split's test as a tensor: the interpreter rejects a scalar's
        used = mask & (tl.full(offs.shape, s, tl.int32) < splits)
        total += tl.load(src_ptr + s * plane + offs, mask=used, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + bias_offs, mask=mask, other=0.0).to(tl.float32)
    out = total.to(dtype)
    if HAS_DELTA:
        out = (out.to(tl.float32) + tl.load(delta_ptr + offs, mask=mask, other=0.0)).to(dtype)
    return out


@triton.jit
def _rotated(lo, hi, cos_lo, cos_hi, sin_lo, sin_hi, dtype: tl.constexpr):
    """A head's rotated halves (rotate-half convention), computed in float32 and rounded once to `dtype`."""
    lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    return (lo * cos_lo + (-hi) * sin_lo).to(dtype), (hi * cos_hi + lo * sin_hi).to(dtype)


def _source(y: torch.Tensor | SplitSums, takes_delta: bool = False):
    """(tensor to read, plane, splits, bias, has_bias) for a kernel's SUMS path; a plain tensor gives
    (y, 0, 0, y, False). A kernel that adds SplitSums.delta says so (`takes_delta`; `_delta` gives its arguments);
    the others refuse one."""
    if isinstance(y, SplitSums):
        if y.delta is not None and not takes_delta:
            raise ValueError("this kernel does not add a LoRA delta to the partials it sums")
        if y.partials.shape[0] > MAX_SPLITS:
            raise ValueError(f"at most {MAX_SPLITS} split-K partials are summed here, got {y.partials.shape[0]}")
        has_bias = y.bias is not None
        return y.partials, y.partials[0].numel(), y.partials.shape[0], y.bias if has_bias else y.partials, has_bias
    return y, 0, 0, y, False


def check_delta(delta: torch.Tensor, y: torch.Tensor | SplitSums) -> None:
    """A LoRA delta that kernels add at the offsets of y's [M, N]: contiguous float32 of y's shape, on its device."""
    if (delta.dtype != torch.float32 or not delta.is_contiguous() or tuple(delta.shape) != tuple(y.shape)
            or delta.device != y.device):
        raise ValueError(f"delta must be contiguous float32 {tuple(y.shape)} on {y.device}, got {delta.dtype} "
                         f"{tuple(delta.shape)} on {delta.device}")


def _delta(y: torch.Tensor | SplitSums) -> tuple[torch.Tensor, bool]:
    """(delta tensor or a stand-in, HAS_DELTA) of a kernel that adds SplitSums.delta."""
    delta = y.delta if isinstance(y, SplitSums) else None
    if delta is None:
        return (y.partials if isinstance(y, SplitSums) else y), False
    check_delta(delta, y)
    if not y.partials.is_contiguous():  # the kernels index the delta with the partials' offsets
        raise ValueError("partials that carry a delta must be contiguous")
    return delta, True


@triton.jit(do_not_specialize=["plane", "splits"])
def _add_rmsnorm_kernel(h_ptr, delta_ptr, weight_ptr, h_out_ptr, y_ptr, ids_ptr, n_cols, stride_h, stride_d, stride_ho,
                        stride_y, eps, plane, splits, bias_ptr, HAS_ADD: tl.constexpr, GATHER: tl.constexpr,
                        SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row: y = rmsnorm(x) with x = h[row] (+ delta[row], stored rounded as h_out[row]), or with GATHER
    x = h[ids[row]] (an embedding table's row, stored as h_out[row]). With SUMS, delta is summed from a linear's
    split-K partials at delta_ptr (rounded once, as the sum kernel rounds it) as it is read."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # the weight first: loaded after the row's sum (as written before) it was a second memory round trip a row; and
    # before the wait for the kernel ahead (no kernel of a step writes it)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    src = tl.load(ids_ptr + row).to(tl.int64) if GATHER else row
    x = tl.load(h_ptr + src * stride_h + cols, mask=mask, other=0.0)
    if HAS_ADD:
        if SUMS:
            delta = _summed(delta_ptr, row * stride_d + cols, mask, plane, splits, bias_ptr, cols,
                            h_out_ptr.dtype.element_ty, HAS_BIAS)
        else:
            delta = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(h_out_ptr.dtype.element_ty)  # stored rounded
        tl.store(h_out_ptr + row * stride_ho + cols, x, mask=mask)
    if GATHER:
        tl.store(h_out_ptr + row * stride_ho + cols, x, mask=mask)
    tl.store(y_ptr + row * stride_y + cols, _normed(x, _inv_rms(x, n_cols, eps), w, y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _inv_rms(x, n_cols, eps):
    """1 / rms of a row's values x (the row's whole block; masked columns hold 0), its squares summed in fp32."""
    xf = x.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)


@triton.jit
def _normed(x, inv, w, dtype: tl.constexpr):
    """weight * (x * inv rounded to dtype), rounded to dtype: the norm's output at x's columns."""
    return (w * (x.to(tl.float32) * inv).to(dtype).to(tl.float32)).to(dtype)


def _norm_warps(n_cols: int) -> int:
    return 4 if n_cols <= 4096 else 8


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | SplitSums | None, weight: torch.Tensor, eps: float,
                num_warps: int | None = None):
    """(h + delta, rmsnorm(h + delta)) for h, delta [T, N] (rows contiguous; delta may be a linear's split-K
    partials, summed here); delta None = plain norm. `num_warps`: a row's warps (bench.glue_kernels' sweep;
    default _norm_warps)."""
    num_rows, n_cols = h.shape
    y = torch.empty_like(h)
    h_out = torch.empty_like(h) if delta is not None else h
    if num_rows == 0:
        return h_out, y
    d, plane, splits, bias, has_bias = _source(delta if delta is not None else h)
    _add_rmsnorm_kernel[(num_rows,)](
        h, d, weight, h_out, y, h, n_cols, h.stride(0), d.stride(-2), h_out.stride(0), y.stride(0), eps,
        plane, splits, bias, HAS_ADD=delta is not None, GATHER=False, SUMS=isinstance(delta, SplitSums),
        HAS_BIAS=has_bias, BLOCK=triton.next_power_of_2(n_cols), num_warps=num_warps or _norm_warps(n_cols),
        **pdl.triton_launch(h.device),
    )  # fmt: skip
    return h_out, y


def embed_rmsnorm(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, eps: float):
    """(table[ids], rmsnorm(table[ids])) for ids [T] and an embedding table [vocab, N] (rows contiguous): the
    embedding lookup in the first norm's launch."""
    n_cols = table.shape[1]
    h = torch.empty((ids.shape[0], n_cols), dtype=table.dtype, device=table.device)
    y = torch.empty_like(h)
    if ids.shape[0] == 0:
        return h, y
    _add_rmsnorm_kernel[(ids.shape[0],)](
        table, table, weight, h, y, ids, n_cols, table.stride(0), 0, h.stride(0), y.stride(0), eps, 0, 0, table,
        HAS_ADD=False, GATHER=True, SUMS=False, HAS_BIAS=False, BLOCK=triton.next_power_of_2(n_cols),
        num_warps=_norm_warps(n_cols), **pdl.triton_launch(table.device),
    )
    return h, y


@triton.jit
def _lora_added(v, row, cols, mask, h_ptr, slice_index, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, stride_hm,
                stride_br, stride_bn, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """v (a linear's output at `cols` of `row`, rounded) plus the token's LoRA delta from slice `slice_index` of its
    row of h, rounded: as the one-row expand adds it (`_row_delta` with the slice's h, the same products in the same
    order); a token without an adapter (slot < 0) keeps v's bits."""
    if slot >= 0:
        rank = tl.load(slot_ranks_ptr + slot)
        first_row = tl.load(slot_offsets_ptr + slot).to(tl.int64)
        delta = _row_delta(h_ptr + row * stride_hm + slice_index * rank, b_ptr, first_row, rank, cols, mask, 0, 0, 0,
                           stride_br, stride_bn, BLOCK, BLOCK_R, 1)
        v = (v.to(tl.float32) + delta).to(v.dtype)
    return v


@triton.jit(do_not_specialize=["plane", "splits"])
def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_out, plane, splits, bias_ptr, delta_ptr,
                     h_ptr, b_ptr, token_slots_ptr, slot_offsets_ptr, slot_ranks_ptr, stride_hm, stride_br, stride_bn,
                     a2_ptr, h2_ptr, slots2_ptr, slot2_offsets_ptr, slot2_ranks_ptr, stride_a2, stride_h2,
                     BLOCK: tl.constexpr, SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, MOST_SPLITS: tl.constexpr,
                     HAS_DELTA: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, SHRINK: tl.constexpr,
                     BLOCK_R2: tl.constexpr, PDL: tl.constexpr):
    """One row's activation at BLOCK columns of the gate (and the same of up). With HAS_LORA, gate and up first take
    the token's pending LoRA delta (`_lora_added`; pending_lora.PendingLora), slice 0 and slice 1 of its h. With
    SHRINK the result's down_proj shrink is added into h2 (`_shrink_added`; act_shrink)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    if SUMS:  # gu_ptr: split-K partials [splits, rows, 2 * inter], at most MOST_SPLITS of them
        at = row * stride_gu + cols
        gate = _summed(gu_ptr, at, mask, plane, splits, bias_ptr, cols, dtype, HAS_BIAS, MOST_SPLITS, delta_ptr,
                       HAS_DELTA)
        up = _summed(gu_ptr, at + inter, mask, plane, splits, bias_ptr, inter + cols, dtype, HAS_BIAS, MOST_SPLITS,
                     delta_ptr, HAS_DELTA)
    else:
        gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
        up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    if HAS_LORA:
        slot = tl.load(token_slots_ptr + row).to(tl.int64)
        gate = _lora_added(gate, row, cols, mask, h_ptr, 0, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr, stride_hm,
                           stride_br, stride_bn, BLOCK, BLOCK_R)
        up = _lora_added(up, row, inter + cols, mask, h_ptr, 1, b_ptr, slot, slot_offsets_ptr, slot_ranks_ptr,
                         stride_hm, stride_br, stride_bn, BLOCK, BLOCK_R)
    gate, up = gate.to(tl.float32), up.to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    out = (act * up).to(dtype)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)
    if SHRINK:
        _shrink_added(out, row, cols, mask, a2_ptr, h2_ptr, slots2_ptr, slot2_offsets_ptr, slot2_ranks_ptr, stride_a2,
                      stride_h2, BLOCK_R2)


def silu_launch(num_rows: int, sums: bool) -> tuple[int, int]:
    """(elements a program, warps) of silu_mul. Partials: up to 16 loads an element, spread over more programs;
    under 8 rows one element a thread (blocks of 256 left 56 programs for the 8B shape's one row, which lost to
    csrc's sum kernel + this kernel; 16 planes a thread is what that sum kernel does)."""
    return (1024, 4) if not sums else (256, 4) if num_rows >= 8 else (64, 2)


def silu_mul(gate_up: torch.Tensor | SplitSums | PendingLora, launch: tuple[int, int] | None = None,
             compiled_splits: bool = COMPILED_SPLITS, shrink=None) -> torch.Tensor:
    """gate_up [T, 2I] (or its split-K partials, or either with a pending LoRA delta) -> silu(gate) * up [T, I].
    `launch`: (elements a program, warps) in place of silu_launch's; `compiled_splits`: the partials' count compiled
    into the kernel (one build a count) instead of read at run time (16 masked loads an element); both for
    bench.glue_kernels' sweep. A pending delta is added here with the one-row expand's launch (its programs' columns
    and warps); without LORAPLEX_LORA_ONE_ROW the expand runs first (its tiles round otherwise). `shrink`
    (act_shrink.ShrinkAhead): down_proj's LoRA shrink of the result, added into shrink.h."""
    lora = one_row = None
    if isinstance(gate_up, PendingLora):
        one_row = one_row_launch(gate_up.lora_b, gate_up.layout)
        if one_row is None or len(gate_up.slice_offsets) != 3 or gate_up.slice_offsets[1] * 2 != gate_up.shape[1]:
            gate_up = gate_up.materialize()
        else:
            lora, gate_up = gate_up, gate_up.base
    num_rows, two_inter = gate_up.shape
    inter = two_inter // 2
    sums = isinstance(gate_up, SplitSums)
    out = torch.empty(num_rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    src, plane, splits, bias, has_bias = _source(gate_up, takes_delta=True)
    delta, has_delta = _delta(gate_up)
    if lora is not None:
        if has_delta:
            raise ValueError("a pending LoRA delta and partials that carry one")
        block_r, block, warps = one_row
        h, lora_b = lora.h, lora.lora_b
        lora_args = (h, lora_b, lora.meta.token_slots, lora.layout.offsets, lora.layout.ranks, h.stride(0),
                     lora_b.stride(0), lora_b.stride(1))
    else:
        block, warps = launch or silu_launch(num_rows, sums)
        block_r, lora_args = 16, (src,) * 5 + (0, 0, 0)  # stand-ins, never read
    shrink_args, block_r2 = silu_shrink_args(shrink, out)
    _silu_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        src, out, inter, src.stride(-2), out.stride(0), plane, splits, bias, delta, *lora_args, *shrink_args,
        BLOCK=block, SUMS=sums, HAS_BIAS=has_bias, MOST_SPLITS=splits if sums and compiled_splits else MAX_SPLITS,
        HAS_DELTA=has_delta, HAS_LORA=lora is not None, BLOCK_R=block_r, SHRINK=shrink is not None,
        BLOCK_R2=block_r2, num_warps=warps,
        **pdl.triton_launch(out.device),
    )  # fmt: skip
    return out


@triton.jit
def _head_halves(x_ptr, row, head, stride_t, stride_h, src_ptr, src_col, plane, splits, stride_src, bias_ptr, offs,
                 delta_ptr, HALF: tl.constexpr, SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """One head's two halves in the tensor's dtype: from x (a view of the qkv output) or, with SUMS, summed from the
    qkv projection's split-K partials at column src_col (and its LoRA delta added, with HAS_DELTA)."""
    if SUMS:
        at = row * stride_src + src_col + offs
        whole = offs < HALF
        dtype = x_ptr.dtype.element_ty
        lo = _summed(src_ptr, at, whole, plane, splits, bias_ptr, src_col + offs, dtype, HAS_BIAS, _MAX_SPLITS,
                     delta_ptr, HAS_DELTA)
        hi = _summed(src_ptr, at + HALF, whole, plane, splits, bias_ptr, src_col + HALF + offs, dtype, HAS_BIAS,
                     _MAX_SPLITS, delta_ptr, HAS_DELTA)
    else:
        base = x_ptr + row * stride_t + head * stride_h
        lo, hi = tl.load(base + offs), tl.load(base + HALF + offs)
    return lo, hi


@triton.jit
def _rotate(x_ptr, row, head, stride_t, stride_h, lo, hi, cos_lo, cos_hi, sin_lo, sin_hi, offs, HALF: tl.constexpr):
    """Rotate one head's halves and store them at x[row, head]; returns the rotated halves (rounded to x's dtype)."""
    base = x_ptr + row * stride_t + head * stride_h
    new_lo, new_hi = _rotated(lo, hi, cos_lo, cos_hi, sin_lo, sin_hi, x_ptr.dtype.element_ty)
    tl.store(base + offs, new_lo)
    tl.store(base + HALF + offs, new_hi)
    return new_lo, new_hi


@triton.jit(do_not_specialize=["plane", "splits"])
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, rope_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_rope,
    stride_cs, stride_ch, src_ptr, bias_ptr, plane, splits, stride_src, delta_ptr,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, SUMS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr,
):  # fmt: skip
    """One program per (token, head): q heads first, then kv heads (rotate k, write k and v to the cache).
    One head a program keeps the grid wide: a program per token looping over 40 heads left 100 of 132
    SMs idle at batch 32 (0.24 ms a step on the 1B shape, H200). With SUMS, q, k and v are read summed from
    the partials at src_ptr (columns q | k | v, heads of 2 * HALF) and written to q_ptr, k_ptr and v_ptr."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, HALF)
    rope = rope_ptr + row * stride_rope  # [2, D]: cos row, then sin row
    cos_lo, cos_hi = tl.load(rope + offs), tl.load(rope + HALF + offs)
    sin_lo, sin_hi = tl.load(rope + 2 * HALF + offs), tl.load(rope + 3 * HALF + offs)
    if head < NUM_Q_HEADS:
        lo, hi = _head_halves(q_ptr, row, head, stride_qt, stride_qh, src_ptr, head * 2 * HALF, plane, splits,
                              stride_src, bias_ptr, offs, delta_ptr, HALF, SUMS, HAS_BIAS, HAS_DELTA)
        _rotate(q_ptr, row, head, stride_qt, stride_qh, lo, hi, cos_lo, cos_hi, sin_lo, sin_hi, offs, HALF)
    else:
        kv_head = head - NUM_Q_HEADS
        lo, hi = _head_halves(k_ptr, row, kv_head, stride_kt, stride_kh, src_ptr, head * 2 * HALF, plane, splits,
                              stride_src, bias_ptr, offs, delta_ptr, HALF, SUMS, HAS_BIAS, HAS_DELTA)
        k_lo, k_hi = _rotate(k_ptr, row, kv_head, stride_kt, stride_kh, lo, hi, cos_lo, cos_hi, sin_lo, sin_hi, offs,
                             HALF)
        v_lo, v_hi = _head_halves(v_ptr, row, kv_head, stride_vt, stride_vh, src_ptr,
                                  (NUM_Q_HEADS + NUM_KV_HEADS + kv_head) * 2 * HALF, plane, splits, stride_src,
                                  bias_ptr, offs, delta_ptr, HALF, SUMS, HAS_BIAS, HAS_DELTA)
        if SUMS:  # the projection's v, kept beside q and k for prefill attention
            v_base = v_ptr + row * stride_vt + kv_head * stride_vh
            tl.store(v_base + offs, v_lo)
            tl.store(v_base + HALF + offs, v_hi)
        slot = tl.load(slot_ptr + row)
        if slot >= 0:
            cache = slot * stride_cs + kv_head * stride_ch
            tl.store(kc_ptr + cache + offs, k_lo.to(kc_ptr.dtype.element_ty))
            tl.store(kc_ptr + cache + HALF + offs, k_hi.to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + cache + offs, v_lo.to(vc_ptr.dtype.element_ty))
            tl.store(vc_ptr + cache + HALF + offs, v_hi.to(vc_ptr.dtype.element_ty))


def rotary_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping, sums: SplitSums | None = None) -> None:
    """q [T, Hq, D], k/v [T, Hkv, D] (last dim contiguous), rope [T, 2, D] float32, caches
    [num_blocks, block_size, Hkv, D] (contiguous), slot_mapping [T] int64. With `sums` (the qkv projection's
    split-K partials, columns q | k | v), q, k and v are written from them instead of rotated in place."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    rope = rope.contiguous()
    flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    src, plane, splits, bias, has_bias = _source(q if sums is None else sums, takes_delta=True)
    delta, has_delta = _delta(q if sums is None else sums)
    _rotary_write_kv_kernel[(num_tokens, num_q_heads + k.shape[1])](
        q, k, v, rope, flat_k, flat_v, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), rope.stride(0),
        flat_k.stride(0), flat_k.stride(1), src, bias, plane, splits, src.stride(-2), delta,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=k.shape[1], HALF=head_dim // 2, SUMS=sums is not None,
        HAS_BIAS=has_bias, HAS_DELTA=has_delta, num_warps=1,
    )  # fmt: skip
