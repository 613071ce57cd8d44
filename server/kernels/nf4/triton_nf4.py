"""Fused NF4 dequant + matmul in Triton: y[T, out] = x[T, in] @ dequant(W)^T (layout: nf4_ops docstring).

Semantics: as ``nf4_ops.nf4_matmul_reference`` (each weight dequantized in fp32 as
``code_table[nibble] * absmax_f[block]``, rounded to x.dtype, fp32 accumulate, + bias, stored as
x.dtype); only the float summation order differs.

How: one program owns an output tile ``[BLOCK_N, BLOCK_T]`` (weights on the MMA M side, so decode's
few tokens sit on the small N side) and a K range. Per 64-element quant block it loads the codes of
its rows as 8 little-endian 32-bit words (``evict_first``: streamed); nibble j of a word is element
``8 * word + j`` at shift ``4 * (j ^ 1)`` (bnb puts even k in the high nibble), so the nibbles expand
straight into k order. Each is looked up in the 16-entry fp32 table with a ``tl.load`` gather
(L1-resident), scaled by the block's absmax in fp32, rounded to x.dtype, and the ``[BLOCK_N, 64]``
tile is ``tl.dot``-ed against x's ``[64, BLOCK_T]`` columns. When there are too few output tiles to
fill the GPU, the K range is split over SPLIT_K programs that write fp32 partials, summed (plus bias,
cast) by server.kernels.nf4.triton_split_k. No host syncs or copies and no autotuning (the config is picked
from the shapes on the host), so calls are CUDA-graph capturable once compiled: warm up first.

Since 2026-12-01 the dispatch (server.kernels.nf4.nf4_dispatch) uses this kernel only where the CUDA
tensor-core kernel does not build; compiled for sm_90 it issues 10-14 instructions per weight (two
64-bit address ops per gather, a register -> shared -> register layout change before each wgmma),
which is why it runs at 1.7-2.1x the time of bf16 cuBLAS (bench/NOTES.md). The older byte-layout
variant, which interleaved even and odd halves, measured the same or slower and was removed.

Decode (T <= 64) is the target. Prefill-sized T runs the same kernel with larger T tiles and reads
the codes once per T tile; it is correct but untuned, and a caller may prefer dequantize + cuBLAS.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.nf4.nf4_layout import (
    NF4_BLOCKSIZE,
    codes_as_words,
    validate_matmul_args,
    validate_nf4_layout,
)
from server.kernels.nf4.triton_split_k import split_k_reduce

_DECODE_MAX_T = 64


@dataclass(frozen=True)
class Nf4KernelConfig:
    """Launch parameters for ``_nf4_matmul_kernel``; ``pick_config`` chooses them from the shapes."""

    block_t: int  # tokens per tile, >= 16 (tl.dot minimum)
    block_n: int  # output features per tile
    k_groups: int  # 64-element quant blocks unrolled per loop step (more bytes in flight)
    split_k: int  # programs sharing one output tile's K range
    num_warps: int = 4
    # Software pipelining (>= 2) turns the table gathers into 4-byte cp.async copies through shared
    # memory (~90-200 KB of it at these tiles, PTX for sm_90): 1 keeps them L1 loads.
    num_stages: int = 1


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, words_ptr, absmax_ptr, table_ptr, bias_ptr, out_ptr,
    num_tokens, out_features, in_features,
    stride_xt, stride_xk, stride_ot, stride_on,
    HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, K_GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    WORDS: tl.constexpr = 8
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_w = tl.arange(0, WORDS)
    shifts = ((tl.arange(0, 8) ^ 1) * 4).to(tl.uint32)
    mask_n = offs_n < out_features
    mask_t = offs_t < num_tokens
    num_k_blocks = in_features // 64
    blocks_per_split = num_k_blocks // SPLIT_K
    word_rows = words_ptr + offs_n[:, None].to(tl.int64) * (in_features // 8) + offs_w[None, :]  # [BLOCK_N, WORDS]
    absmax_rows = absmax_ptr + offs_n.to(tl.int64) * num_k_blocks
    offs_k = tl.arange(0, 64)
    x_cols = x_ptr + offs_t[None, :].to(tl.int64) * stride_xt + offs_k[:, None] * stride_xk  # [64, BLOCK_T]
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    first_block = pid_k * blocks_per_split
    for block0 in range(first_block, first_block + blocks_per_split, K_GROUPS):
        for g in tl.static_range(K_GROUPS):
            block = block0 + g
            words = tl.load(word_rows + block * WORDS, mask=mask_n[:, None], other=0,
                            eviction_policy="evict_first").to(tl.uint32, bitcast=True)  # [BLOCK_N, WORDS]
            nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, WORDS, 8]
            scale = tl.load(absmax_rows + block, mask=mask_n, other=0.0)[:, None, None]
            w = tl.reshape((tl.load(table_ptr + nibbles) * scale).to(x_ptr.dtype.element_ty), (BLOCK_N, 64))
            xt = tl.load(x_cols + (block * 64) * stride_xk, mask=mask_t[None, :], other=0.0)  # [64, BLOCK_T]
            if UPCAST_DOT:
                w, xt = w.to(tl.float32), xt.to(tl.float32)
            acc = tl.dot(w, xt, acc)
    out_mask = mask_n[:, None] & mask_t[None, :]
    out_offs = offs_t[None, :].to(tl.int64) * stride_ot + offs_n[:, None] * stride_on
    if WRITE_PARTIAL:
        partial_ptr = out_ptr + pid_k.to(tl.int64) * num_tokens * out_features
        tl.store(partial_ptr + out_offs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)



@functools.cache
def device_num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: no query on the hot path)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_config(num_tokens: int, out_features: int, in_features: int, num_sms: int) -> Nf4KernelConfig:
    """Tiles from the shapes (heuristic, not yet tuned on a GPU).

    Decode splits K until the programs fill one wave of SMs, but caps SPLIT_K so the fp32 partials
    (written and read back: 8 * SPLIT_K * T * out bytes) stay under half the code bytes (out * in / 2).
    """
    num_k_blocks = in_features // NF4_BLOCKSIZE
    k_groups = next(g for g in (4, 2, 1) if num_k_blocks % g == 0)
    if num_tokens > _DECODE_MAX_T:
        block_t = 64 if num_tokens <= 256 else 128
        return Nf4KernelConfig(block_t, 128, k_groups=min(k_groups, 2), split_k=1, num_warps=8)
    # Decode tiles from a sweep on an H100 (bench/results/2026-11-23-*-nf4-sweep.txt, Llama-3.1-8B
    # shapes, T=1 and 32): split K as far as 8 ways (more programs in flight hides the load latency
    # of num_stages=1), 128-wide tiles only for very wide outputs, 4 quant blocks per step for long K.
    block_t = max(16, triton.next_power_of_2(num_tokens))
    block_n = 128 if out_features >= 16384 else 64
    k_groups = next(g for g in ((4, 2, 1) if in_features >= 8192 else (2, 1)) if num_k_blocks % g == 0)
    max_split_k = max(1, in_features // (32 * num_tokens))  # fp32 partials <= half the code bytes
    split_k = next(
        s for s in (8, 4, 2, 1) if s <= max_split_k and num_k_blocks % (s * k_groups) == 0
    )
    return Nf4KernelConfig(block_t, block_n, k_groups, split_k)


def nf4_matmul_triton(
    x: torch.Tensor,  # [T, in] bf16 / fp16
    codes: torch.Tensor,  # [out * in / 2, 1] uint8
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    out: torch.Tensor | None = None,  # [T, out] x.dtype
    bias: torch.Tensor | None = None,  # [out]
    config: Nf4KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the fused kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    validate_nf4_layout(codes, absmax_f, shape, code_table)
    validate_matmul_args(x, shape, bias)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16, got {x.dtype}")
    out_features, in_features = shape
    num_tokens = x.shape[0]
    if out is None:
        out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    elif out.shape != (num_tokens, out_features) or out.dtype != x.dtype:
        raise ValueError(f"out must be [{num_tokens}, {out_features}] {x.dtype}")
    if num_tokens == 0:
        return out
    if config is None:
        sm_count = device_num_sms(x.device.index or 0) if x.is_cuda else 132
        config = pick_config(num_tokens, out_features, in_features, sm_count)
    if (in_features // NF4_BLOCKSIZE) % (config.split_k * config.k_groups) != 0:
        raise ValueError(f"{config} does not divide {in_features // NF4_BLOCKSIZE} quant blocks")
    tensors = (codes, absmax_f, code_table) if bias is None else (codes, absmax_f, code_table, bias)
    if any(t.device != x.device for t in tensors) or code_table.dtype != torch.float32:
        raise ValueError("codes, absmax_f, code_table (float32) and bias must be on x's device")
    has_bias = bias is not None
    bias_arg = bias if has_bias else code_table  # never read when HAS_BIAS is False
    is_split = config.split_k > 1
    partial = (
        torch.empty(config.split_k, num_tokens, out_features, dtype=torch.float32, device=x.device)
        if is_split
        else None
    )
    target = partial if is_split else out
    stride_ot, stride_on = (out_features, 1) if is_split else out.stride()
    grid = (
        triton.cdiv(out_features, config.block_n),
        triton.cdiv(num_tokens, config.block_t),
        config.split_k,
    )
    _nf4_matmul_kernel[grid](
        x, codes_as_words(codes), absmax_f, code_table, bias_arg, target,
        num_tokens, out_features, in_features,
        x.stride(0), x.stride(1), stride_ot, stride_on,
        HAS_BIAS=has_bias, WRITE_PARTIAL=is_split, UPCAST_DOT=not x.is_cuda,
        BLOCK_T=config.block_t, BLOCK_N=config.block_n, K_GROUPS=config.k_groups, SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if is_split:
        split_k_reduce(partial, bias_arg if has_bias else None, out)
    return out
