"""Variable-length prefill attention over the paged cache in one launch per layer (Triton).

Semantics (as ``attention_ops.prefill_attention_torch``): sequence s has q_len[s] new query rows
starting at row q_start[s] of q, and ctx_len[s] tokens in the cache once this chunk is written (its
cached prefix, then the chunk itself: the caller writes the chunk's K/V before attending). Query row j
of s sits at position p = ctx_len - q_len + j and attends, causally, to cache positions 0..p of its
block table; query head h reads kv head h // group. Softmax in fp32, output in q.dtype.

How: a flat list of (sequence, first query row) tiles of BLOCK_M rows, built on the host, is the grid's
first axis and query heads its second, so prompts of any length mix in one launch (no padding to the
longest). Each program streams key/value tiles of BLOCK_N positions through the block table with an
online softmax, and stops at its last row's position: the causal work only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from server.kernels.host_device import to_device

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_tables"])  # the block-table width follows the prompts
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, tile_seq_ptr, tile_row_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
    qk_scale, group,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_tables,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    first_row = tl.load(tile_row_ptr + tile)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_len_ptr + seq)
    ctx_len = tl.load(ctx_len_ptr + seq)
    kv_head = head // group
    rows = first_row + tl.arange(0, BLOCK_M)  # query rows within the chunk
    row_mask = rows < q_len
    q_pos = ctx_len - q_len + rows  # absolute positions
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows.to(tl.int64))[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    num_keys = tl.minimum(ctx_len, ctx_len - q_len + first_row + BLOCK_M)  # up to the tile's last position
    table = tables_ptr + seq.to(tl.int64) * stride_tables
    for start in range(0, num_keys, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        is_key = positions < num_keys
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=is_key, other=0).to(tl.int64)
        offsets = positions % BLOCK_SIZE
        k = tl.load(k_ptr + blocks[:, None] * stride_kb + offsets[:, None] * stride_kt + kv_head * stride_kh
                    + dims[None, :], mask=is_key[:, None], other=0.0)
        v = tl.load(v_ptr + blocks[:, None] * stride_vb + offsets[:, None] * stride_vt + kv_head * stride_vh
                    + dims[None, :], mask=is_key[:, None], other=0.0)
        if UPCAST_DOT:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        allowed = (positions[None, :] <= q_pos[:, None]) & is_key[None, :]
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past q_len see no key at all
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + rows.to(tl.int64))[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


class LaunchMeta(NamedTuple):
    """One launch's device metadata: the (sequence, first row) tiles and each sequence's facts."""

    num_tiles: int
    tile_seq: torch.Tensor
    tile_row: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    ctx_len: torch.Tensor
    tables: torch.Tensor  # [num_seqs, max_blocks] int32


def launch_meta(seqs: list, block_m: int, device: torch.device) -> LaunchMeta:
    """Built from host facts and copied to the device in one asynchronous copy: no stream sync, so the
    host goes on queueing the layer's kernels while the GPU works (a sync per layer made an eager
    prefill step cost host time plus device time)."""
    tile_seq, tile_row = [], []
    for i, seq in enumerate(seqs):
        for row in range(0, seq.q_len, block_m):
            tile_seq.append(i)
            tile_row.append(row)
    blocks = [seq.block_ids if seq.block_ids is not None else seq.block_table.tolist() for seq in seqs]
    max_blocks = max(len(b) for b in blocks)
    flat = tile_seq + tile_row + [s.q_start for s in seqs] + [s.q_len for s in seqs] + [s.ctx_len for s in seqs]
    for table in blocks:
        flat += table + [0] * (max_blocks - len(table))
    on_device = to_device(flat, torch.int32, device)
    n, t = len(seqs), len(tile_seq)
    parts = on_device.split([t, t, n, n, n, n * max_blocks])
    return LaunchMeta(t, *parts[:5], parts[5].view(n, max_blocks))


def prefill_attention_triton(
    q: torch.Tensor,  # [T, Hq, D] (last dim contiguous)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    seqs: list,  # PrefillSeq: q_start, q_len, ctx_len, block_table (block_ids when the host has them)
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
    memo: dict | None = None,
) -> torch.Tensor:
    """Attention output [T, Hq, D] for every prefill row, one launch. `memo` (one dict per step, shared
    by the layers) keeps the launch metadata, which is the same in every layer."""
    out = torch.empty_like(q)
    if not seqs:
        return out
    key = ("prefill_attention", block_m, tuple((s.q_start, s.q_len, s.ctx_len) for s in seqs))
    meta = None if memo is None else memo.get(key)
    if meta is None:
        meta = launch_meta(seqs, block_m, q.device)
        if memo is not None:
            memo[key] = meta
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _prefill_kernel[(meta.num_tiles, num_q_heads)](
        q, k_cache, v_cache, out, meta.tables, meta.tile_seq, meta.tile_row, meta.q_start, meta.q_len, meta.ctx_len,
        scale * _LOG2E, num_q_heads // k_cache.shape[2],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        meta.tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, UPCAST_DOT=not q.is_cuda,
        # float32 models get float32 products, as in decode (Triton's default for float32 on tensor cores is tf32:
        # a 64-wide-head fp32 Llama's eager prefill was ~1e-3 off transformers, twenty-second session)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if head_dim <= 64 else 8, num_stages=2 if q.is_cuda else 1,
    )  # fmt: skip
    return out
