"""NF4 GEMV in Triton for one token: y[1, out] = x[1, in] @ dequant(W)^T (layout: nf4_ops docstring).

Semantics: as ``nf4_ops.nf4_matmul_reference`` (each weight dequantized in fp32 as
``code_table[nibble] * absmax_f[block]``, rounded to x.dtype, products summed in fp32, + bias, stored
as x.dtype); only the summation order differs.

How: the packed codes are read as 32-bit words (8 nibbles, no repacking: bnb's byte order puts the
element of even k in the high nibble, so nibble ``j`` of a little-endian word is element
``8 * word + j`` at shift ``4 * (j ^ 1)``). One program owns ``BLOCK_N`` rows and a K range; it keeps
a ``[BLOCK_N, 8, 8]`` fp32 accumulator of products (CUDA-core FMAs: at one token a tensor-core tile
would be 1/16 used and would need a register-to-shared-memory layout change per tile) and reduces it
once at the end. Too few rows to fill the GPU split K over SPLIT_K programs whose fp32 partials the
shared ``_split_k_reduce_kernel`` sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.model.nf4_layout import NF4_BLOCKSIZE
from server.model.triton_split_k import split_k_reduce


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, words_ptr, absmax_ptr, table_ptr, bias_ptr, out_ptr, out_features, in_features,
    HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr, K_GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    WORDS: tl.constexpr = 8  # 32-bit words per 64-element quant block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n = offs_n < out_features
    offs_w = tl.arange(0, WORDS)  # [WORDS]
    shifts = ((tl.arange(0, 8) ^ 1) * 4).to(tl.uint32)  # [8]: nibble j of a word in k order
    num_k_blocks = in_features // 64
    blocks_per_split = num_k_blocks // SPLIT_K
    word_rows = words_ptr + offs_n[:, None].to(tl.int64) * (in_features // 8) + offs_w[None, :]  # [BLOCK_N, WORDS]
    absmax_rows = absmax_ptr + offs_n.to(tl.int64) * num_k_blocks  # [BLOCK_N]
    x_block = x_ptr + offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]  # [WORDS, 8]: one quant block of x
    acc = tl.zeros((BLOCK_N, WORDS, 8), dtype=tl.float32)
    first_block = pid_k * blocks_per_split
    for block0 in range(first_block, first_block + blocks_per_split, K_GROUPS):
        for g in tl.static_range(K_GROUPS):
            block = block0 + g
            words = tl.load(word_rows + block * WORDS, mask=mask_n[:, None], other=0,
                            eviction_policy="evict_first").to(tl.uint32, bitcast=True)  # [BLOCK_N, WORDS]
            nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, WORDS, 8]
            scale = tl.load(absmax_rows + block, mask=mask_n, other=0.0)[:, None, None]
            w = (tl.load(table_ptr + nibbles) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
            xv = tl.load(x_block + block * 64).to(tl.float32)  # [WORDS, 8]
            acc += w * xv[None, :, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BLOCK_N]
    if WRITE_PARTIAL:
        tl.store(out_ptr + pid_k.to(tl.int64) * out_features + offs_n, y, mask=mask_n)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def pick_gemv_config(out_features: int, in_features: int, num_sms: int) -> tuple[int, int, int, int]:
    """(block_n, k_groups, split_k, num_warps): enough programs for two waves of SMs."""
    num_k_blocks = in_features // NF4_BLOCKSIZE
    block_n = 64
    k_groups = next(g for g in (4, 2, 1) if num_k_blocks % g == 0)
    tiles = triton.cdiv(out_features, block_n)
    split_k = 1
    while split_k < 8 and tiles * split_k < 2 * num_sms and num_k_blocks % (2 * split_k * k_groups) == 0:
        split_k *= 2
    return block_n, k_groups, split_k, 4


def nf4_gemv_triton(
    x: torch.Tensor,  # [1, in] bf16 / fp16, contiguous
    words: torch.Tensor,  # packed codes viewed as int32 [out * in / 8]
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    out: torch.Tensor,  # [1, out] x.dtype, contiguous
    bias: torch.Tensor | None = None,  # [out]
    config: tuple[int, int, int, int] | None = None,  # (block_n, k_groups, split_k, num_warps)
    num_sms: int = 132,
) -> torch.Tensor:
    """Launch the GEMV; the caller (nf4_ops dispatch) has validated shapes, dtypes and devices."""
    out_features, in_features = shape
    block_n, k_groups, split_k, num_warps = config or pick_gemv_config(out_features, in_features, num_sms)
    has_bias = bias is not None
    bias_arg = bias if has_bias else code_table  # never read when HAS_BIAS is False
    partial = torch.empty(split_k, out_features, dtype=torch.float32, device=x.device) if split_k > 1 else None
    grid = (triton.cdiv(out_features, block_n), split_k)
    _nf4_gemv_kernel[grid](
        x, words, absmax_f, code_table, bias_arg, out if partial is None else partial, out_features, in_features,
        HAS_BIAS=has_bias, WRITE_PARTIAL=partial is not None,
        BLOCK_N=block_n, K_GROUPS=k_groups, SPLIT_K=split_k, num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    if partial is not None:
        split_k_reduce(partial, bias if has_bias else None, out)
    return out
