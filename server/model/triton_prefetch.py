"""L2 prefetches from Triton kernels: lines asked of the L2 that a later kernel reads, issued by a kernel
that runs before it and leaves DRAM bandwidth idle. Nothing waits for them and no value changes, so a kernel can
issue them before its programmatic-dependent-launch wait (the lines it names are written by nobody in the step).
Inline PTX: CUDA only, never under the interpreter."""

from __future__ import annotations

import torch
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
    first = share.to(tl.int64) * lines // shares  # in 64 bits: a share times a large weight's lines
    last = (share.to(tl.int64) + 1) * lines // shares
    for line in range(first, last, THREADS):
        at = line + tl.arange(0, THREADS)
        prefetch_l2(ptr + tl.minimum(at, last - 1).to(tl.int64) * per_line)


@triton.jit
def prefetch_program_shares(ptr0, count0, ptr1, count1, THREADS: tl.constexpr):
    """This program's shares of two ranges (prefetch_args' tensors), the grid's programs (up to three dimensions)
    each taking one share of each."""
    share = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    shares = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    prefetch_share(ptr0, count0, share, shares, THREADS)
    prefetch_share(ptr1, count1, share, shares, THREADS)


def prefetch_args(tensors: tuple[torch.Tensor, ...], stand_in: torch.Tensor) -> tuple:
    """(ptr0, count0, ptr1, count1, enabled) for a kernel's two prefetch ranges: `tensors` (none, one or two
    contiguous CUDA tensors: weight_prefetch.decode_weights), stand_in where absent."""
    if len(tensors) > 2 or any(not (t.is_cuda and t.is_contiguous()) for t in tensors):
        raise ValueError("at most two contiguous CUDA tensors can be prefetched")
    padded = list(tensors) + [stand_in] * (2 - len(tensors))
    counts = [t.numel() for t in tensors] + [0] * (2 - len(tensors))
    return padded[0], counts[0], padded[1], counts[1], bool(tensors)
