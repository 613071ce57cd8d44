"""Sum the fp32 partials of a split-K launch (+ bias), cast, and store: shared by the NF4 kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, out_ptr, num_tokens, out_features, stride_ot, stride_on,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat index into [T, out]
    numel = num_tokens * out_features
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + s * numel + offs, mask=mask, other=0.0)
    col = offs % out_features
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    out_offs = (offs // out_features).to(tl.int64) * stride_ot + col * stride_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_reduce(
    partial: torch.Tensor,  # [SPLIT_K, T, out] or [SPLIT_K, out] float32, contiguous
    bias: torch.Tensor | None,  # [out]
    out: torch.Tensor,  # [T, out]
) -> torch.Tensor:
    """out = sum over the first axis of `partial` (+ bias), in out's dtype."""
    num_tokens, out_features = out.shape
    block = 1024
    _split_k_reduce_kernel[(triton.cdiv(num_tokens * out_features, block),)](
        partial, bias if bias is not None else partial, out, num_tokens, out_features, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=partial.shape[0], BLOCK=block,
    )  # fmt: skip
    return out
