"""L2 prefetches from Triton kernels: lines asked of the L2 that a later kernel reads, issued by a kernel that runs
before it and leaves DRAM bandwidth idle (the LoRA shrink on the side stream, for the expand's B:
LORAPLEX_LORA_PREFETCH_B). Nothing waits for them and no value changes. Inline PTX: CUDA only, never under the
interpreter. (LORAPLEX_PREFETCH_WEIGHTS, the decode glue kernels asking for the next matmul's NF4 tiles, measured
slower on the H200 in the forty-sixth session, was removed; design in 4f37464.)"""

from __future__ import annotations

import triton
import triton.language as tl

_LINE_BYTES = tl.constexpr(128)  # an L2 line


@triton.jit
def prefetch_l2(ptrs):
    """Ask the L2 for the lines at ptrs, at the normal eviction priority: an evict_last priority would outlive the one
    read the lines are for (nothing resets it) and outrank the step's split-K partials and KV in the L2."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_share(ptr, count, share, shares, THREADS: tl.constexpr):
    """Prefetch share `share` of `shares` of the `count` elements from ptr, a line a thread at a time (THREADS: the
    program's, 32 x num_warps, so that no line is asked for twice; the shares' lines partition the range's)."""
    per_line: tl.constexpr = _LINE_BYTES * 8 // ptr.dtype.element_ty.primitive_bitwidth
    lines = tl.cdiv(count, per_line)
    first = share.to(tl.int64) * lines // shares  # in 64 bits: a share times a long range's lines
    last = (share.to(tl.int64) + 1) * lines // shares
    for line in range(first, last, THREADS):
        at = line + tl.arange(0, THREADS)
        prefetch_l2(ptr + tl.minimum(at, last - 1).to(tl.int64) * per_line)
