"""NF4 (bitsandbytes 4-bit NormalFloat) weight ops: pure-torch references and the one entry point, nf4_matmul.

Layout of a weight quantized by ``bitsandbytes.functional.quantize_4bit(w, quant_type="nf4",
blocksize=64)``, with ``w`` of shape ``[out_features, in_features]`` (found by experiment against
``bitsandbytes.functional.dequantize_4bit`` 0.50.2 on CPU, pinned by tests/unit/test_nf4_ops.py):

- ``codes``: uint8 ``[out * in / 2, 1]`` (any quant_storage dtype is viewed as uint8). The weight is
  flattened row-major; byte ``i`` holds flat element ``2i`` in its HIGH nibble and ``2i + 1`` in its
  LOW nibble.
- ``code_table``: ``quant_state.code``, float32 ``[16]``; a nibble is an index into it (NF4 is sorted
  ascending: ``code[0] = -1``, ``code[7] = 0``, ``code[15] = 1``).
- ``absmax_f``: float32 ``[out * in / 64]``, one scale per 64 consecutive flat elements. With double
  quant (``compress_statistics=True``) bnb stores ``absmax - offset`` (offset: their mean) as uint8
  indices into ``state2.code``, scaled per 256 blocks by ``state2.absmax``; ``nf4_absmax_float``
  undoes that. Compute it once at load time: as float32 it adds 1/16 byte per parameter of traffic
  to the codes' 1/2 (uint8 plus the per-256 scales would add ~1/64).

Semantics (every function here computes exactly this, up to float summation order)::

    for n in range(out):
        for k in range(in):
            f = n * in + k
            byte = codes[f // 2]
            nibble = byte >> 4 if f % 2 == 0 else byte & 0xF
            W[n, k] = code_table[nibble] * absmax_f[f // 64]       # float32, bit-equal to bnb
    for t in range(T):
        for n in range(out):
            y[t, n] = sum_k x[t, k] * W[n, k].to(x.dtype) (+ bias[n]), fp32 accumulate, stored as x.dtype
"""

from __future__ import annotations

import torch

from server.kernels.nf4.nf4_layout import (  # noqa: F401  (re-exported: the ops' public surface)
    NF4_BLOCKSIZE,
    codes_as_bytes,
    validate_matmul_args,
    validate_nf4_layout,
)
from server.kernels.split_sums import SplitSums


def nf4_absmax_float(quant_state) -> torch.Tensor:
    """Real per-64-block absmax as float32 [num_blocks], undoing bnb's double quantization."""
    if quant_state.blocksize != NF4_BLOCKSIZE:
        raise ValueError(f"NF4 ops need blocksize {NF4_BLOCKSIZE}, got {quant_state.blocksize}")
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    block_ids = torch.arange(quant_state.absmax.numel(), device=quant_state.absmax.device)
    # Same fp32 ops in the same order as bnb: code2[q] * absmax2[i // blocksize2], then + offset.
    absmax = state2.code[quant_state.absmax.long()] * state2.absmax[block_ids // state2.blocksize]
    return absmax + quant_state.offset


def nf4_dequantize_reference(
    codes: torch.Tensor,  # [out * in / 2, 1] uint8 (or any quant_storage dtype)
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
) -> torch.Tensor:
    """Float32 weight [out, in], bit-identical to ``bnb.functional.dequantize_4bit`` in fp32."""
    validate_nf4_layout(codes, absmax_f, shape, code_table)
    packed = codes_as_bytes(codes)
    nibbles = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1).long()  # [out * in]
    values = code_table.float()[nibbles].view(-1, NF4_BLOCKSIZE)
    return (values * absmax_f.view(-1, 1)).view(tuple(shape))


def nf4_matmul_reference(
    x: torch.Tensor,  # [T, in] bf16 / fp16 / fp32
    codes: torch.Tensor,
    absmax_f: torch.Tensor,
    shape,
    code_table: torch.Tensor,
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:
    """y [T, out] = x @ W^T with W dequantized then rounded to x.dtype, fp32 accumulate, in x.dtype."""
    validate_matmul_args(x, shape, bias)
    weight = nf4_dequantize_reference(codes, absmax_f, shape, code_table).to(x.dtype)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def nf4_matmul(
    x: torch.Tensor,  # [T, in] bf16 / fp16 (any dtype on the CPU)
    codes: torch.Tensor,  # [out * in / 2, 1] uint8
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    out: torch.Tensor | None = None,  # [T, out] x.dtype
    bias: torch.Tensor | None = None,  # [out]
    quant_state=None,  # bnb QuantState, for the dispatch's bitsandbytes fallback
    tiled: tuple[torch.Tensor, torch.Tensor] | None = None,  # nf4_layout.tile_pack of (codes, absmax_f)
    defer_sum: bool = False,  # without `out`: the CUDA kernels may return split_sums.SplitSums
) -> torch.Tensor | SplitSums:
    """y = x @ W^T: on CUDA the kernel server.kernels.nf4.nf4_dispatch picks for T rows, else the reference."""
    validate_matmul_args(x, shape, bias)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        from server.kernels.nf4.nf4_dispatch import nf4_linear_cuda

        y = nf4_linear_cuda(x, codes, absmax_f, shape, code_table, bias, quant_state, tiled=tiled,
                            defer_sum=defer_sum and out is None)
    else:
        y = nf4_matmul_reference(x, codes, absmax_f, shape, code_table, bias=bias)
    return y if out is None else out.copy_(y)
