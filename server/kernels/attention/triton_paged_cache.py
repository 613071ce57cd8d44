"""Where a row's positions sit in the paged KV cache, for the decode attention's kernel (triton_attention): the block
table's lookup, the address of each position's row of one kv head, and a tile's k and v addresses."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ptrs(block_tables_ptr, row, stride_bt, tile, cached, k_ptr, v_ptr, kv_head, dims, stride_kb, stride_kt,
               stride_kh, stride_vb, stride_vt, stride_vh, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The k and v addresses [TILE_N, HEAD_DIM] of a row's cache positions tile * TILE_N .., and which of them the
    row holds (< cached)."""
    positions = tile * TILE_N + tl.arange(0, TILE_N)
    is_valid = positions < cached
    block_ids = _block_ids(block_tables_ptr, row, stride_bt, positions, is_valid, BLOCK_SIZE)
    k_rows = _row_starts(k_ptr, block_ids, positions, kv_head, stride_kb, stride_kt, stride_kh, BLOCK_SIZE)
    v_rows = _row_starts(v_ptr, block_ids, positions, kv_head, stride_vb, stride_vt, stride_vh, BLOCK_SIZE)
    return k_rows + dims[None, :], v_rows + dims[None, :], is_valid


@triton.jit
def _block_ids(block_tables_ptr, row, stride_bt, positions, valid, BLOCK_SIZE: tl.constexpr):
    """The cache blocks (int64) that hold the row's `positions` (0 where not valid: never read)."""
    return tl.load(block_tables_ptr + row * stride_bt + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)


@triton.jit
def _row_starts(cache_ptr, block_ids, positions, kv_head, stride_b, stride_t, stride_h, BLOCK_SIZE: tl.constexpr):
    """Where one kv head's cache row of each position starts ([positions, 1]), the positions in `block_ids`' blocks."""
    return cache_ptr + block_ids[:, None] * stride_b + (positions % BLOCK_SIZE)[:, None] * stride_t + kv_head * stride_h

