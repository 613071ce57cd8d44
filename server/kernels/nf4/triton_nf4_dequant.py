"""NF4 dequantization into a reused 16-bit scratch buffer, for prefill-sized matmuls through cuBLAS.

Semantics: ``out.view(out_features, in_features) == nf4_dequantize_reference(...).to(out.dtype)``
exactly (fp32 ``code_table[nibble] * absmax_f[block]``, then one rounding). Reads the codes as 32-bit
words of 8 nibbles (nibble j of a little-endian word is element 8 * word + j, at shift
4 * (j ^ 1)). One pass: 0.5625 byte/param in, 2 out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nf4_dequant_kernel(words_ptr, absmax_ptr, table_ptr, out_ptr, num_words, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] word indices
    mask = offs < num_words
    words = tl.load(words_ptr + offs, mask=mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    shifts = ((tl.arange(0, 8) ^ 1) * 4).to(tl.uint32)  # [8]: nibble j of a word in k order
    nibbles = (words[:, None] >> shifts[None, :]) & 0xF  # [BLOCK, 8]
    scale = tl.load(absmax_ptr + offs // 8, mask=mask, other=0.0)[:, None]  # 8 words per 64-element block
    values = (tl.load(table_ptr + nibbles) * scale).to(out_ptr.dtype.element_ty)
    out_offs = offs[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(out_ptr + out_offs, values, mask=mask[:, None])


def nf4_dequantize_triton(
    words: torch.Tensor,  # packed codes viewed as int32 [out * in / 8]
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    code_table: torch.Tensor,  # [16] float32
    out: torch.Tensor,  # at least out * in elements, bf16 / fp16 (the scratch buffer)
) -> torch.Tensor:
    """Fill the first ``8 * words.numel()`` elements of `out` (flat, row-major weight) and return them."""
    num_words = words.numel()
    flat = out.view(-1)[: num_words * 8]
    block = 256
    _nf4_dequant_kernel[(triton.cdiv(num_words, block),)](words, absmax_f, code_table, flat, num_words, BLOCK=block,
                                                         num_warps=4)
    return flat
