"""The Triton side of programmatic dependent launch (server.kernels.pdl): the call a taking-part kernel makes first."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL (a launch with server.kernels.pdl's options): wait until the kernel ahead has completed and its memory
    is visible, then let the kernel behind launch. Before a kernel's first read of an activation and first store."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
