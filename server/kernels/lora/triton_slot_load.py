"""One kernel that fills an adapter's slot in every rank pool: the slot load as a handful of launches.

The batched slot load (`LoraSlots._copy_into`: foreach calls) still builds about four tensor views and a
copy per adapter tensor on the engine thread, about 50 us each: 20-30 ms for an 8B rank-16 adapter (448
tensors) and 10-20 ms for a 1B one on the H200, during which no step runs. In the 1,000-adapter load
those steps were half of the measured load's time. Here the host writes one descriptor per tensor (eight
integers, no tensor op) and one launch per source dtype copies them all from a device staging buffer
into the pools, which are views of one flat buffer (`LoraSlots.flat`):

    dst[dst_off + i * dst_ld + j] = round(float(src[src_off + i * src_rs + j * src_cs]) * (scale if B else 1))

for i < rows, j < cols. A (rank x in) is a plain copy; B (out x rank in the file) lands transposed in the
slot's rows, scaled in float32 and rounded once, as `LoraLinear.load_slot` (the reference) does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
FIELDS = 8  # src_off, dst_off, rows, cols, dst_ld, src_rs, src_cs, scaled


@triton.jit
def _scatter_kernel(src_ptr, dst_ptr, desc_ptr, scale, BLOCK: tl.constexpr):
    desc = desc_ptr + tl.program_id(0) * 8
    src_off = tl.load(desc)
    dst_off = tl.load(desc + 1)
    rows = tl.load(desc + 2)
    cols = tl.load(desc + 3)
    start = tl.program_id(1).to(tl.int64) * BLOCK
    if start >= rows * cols:
        return
    dst_ld = tl.load(desc + 4)
    src_rs = tl.load(desc + 5)
    src_cs = tl.load(desc + 6)
    scaled = tl.load(desc + 7)
    e = start + tl.arange(0, BLOCK)
    mask = e < rows * cols
    i = e // cols
    j = e % cols
    v = tl.load(src_ptr + src_off + i * src_rs + j * src_cs, mask=mask, other=0.0).to(tl.float32)
    v = tl.where(scaled != 0, v * scale, v)
    tl.store(dst_ptr + dst_off + i * dst_ld + j, v.to(dst_ptr.dtype.element_ty), mask=mask)


def scatter(src: torch.Tensor, dst: torch.Tensor, descriptors: torch.Tensor, max_elements: int,
            scale: float) -> None:
    """Run the descriptors ([n, FIELDS] int64, on dst's device) from `src` (1-D, the source dtype) into
    `dst` (1-D, the pool's dtype), on the current stream."""
    if descriptors.shape[0] == 0:
        return
    grid = (descriptors.shape[0], triton.cdiv(max(max_elements, 1), BLOCK))
    _scatter_kernel[grid](src, dst, descriptors, float(scale), BLOCK=BLOCK, num_warps=4)


def warm_up(dst: torch.Tensor) -> None:
    """Build the kernel for every source dtype a stored adapter can have (one no-op descriptor each), at
    start-up: on the H200 the first cold adapter's load otherwise built it inside its step."""
    descriptor = torch.zeros(1, FIELDS, dtype=torch.int64, device=dst.device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        src = torch.zeros(64, dtype=dtype, device=dst.device)
        grid = (1, 1)
        _scatter_kernel[grid](src, dst, descriptor, 1.0, BLOCK=BLOCK, num_warps=4)
