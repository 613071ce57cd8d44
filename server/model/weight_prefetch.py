"""Which weights a decode step's glue kernels ask the L2 for ahead of the matmul that reads them
(LORAPLEX_PREFETCH_WEIGHTS=1, off until timed): the fused rotary decode attention prefetches o_proj's NF4 tiles,
and the activation after gate_up the next layer's qkv_proj's, while the kernels between leave DRAM bandwidth idle
(the 8B merged batch-32 layer on an H100, forty-fourth session: qkv 11.6 us against a 4.7-us floor, o 9.1 against
3.1; the attention reads 25 MB in 15.7 us, down 33 MB in 20.7). triton_prefetch issues them."""

from __future__ import annotations

import os

import torch

PREFETCH_WEIGHTS = os.environ.get("LORAPLEX_PREFETCH_WEIGHTS", "0") == "1"


def decode_weights(linear) -> tuple[torch.Tensor, ...]:
    """The tensors a decode step's NF4 kernel streams for `linear` (a LoraLinear's base, or an NF4Linear): its tile
    layout's codes and scales; none when prefetching is off, the layer has no tile layout (CPU, 16-bit), or the
    kernels in force read bitsandbytes' layout instead (no CUDA extension: nf4_dispatch's table)."""
    if linear is None or not PREFETCH_WEIGHTS:
        return ()
    tiled = getattr(getattr(linear, "base", linear), "tiled", None)
    if tiled is None:
        return ()
    from server.model import nf4_dispatch

    return tuple(tiled) if nf4_dispatch.kernel_table() == nf4_dispatch.WITH_CUDA_KERNEL else ()
