"""NF4 matmul on tensor cores for 1-64 rows, a CUDA extension compiled on first use (csrc/nf4_mma.cu).

Semantics: as ``nf4_ops.nf4_matmul_reference`` (fp32 dequantize, one rounding to x.dtype, fp32
accumulate). Reads bitsandbytes' codes as stored (no repacked copy, so merged swaps need nothing
rebuilt). Needs nvcc and an sm_80+ GPU; ``is_available()`` says whether it built. The CPU never
imports torch's extension builder.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from server.model.nf4_layout import NF4_BLOCKSIZE, codes_as_bytes

log = logging.getLogger(__name__)
MAX_ROWS = 64


@functools.cache
def _extension():
    """Build (or load from torch's extension cache) the kernel for the current GPU's architecture."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    source = Path(__file__).parent / "csrc" / "nf4_mma.cu"
    return load(name="loraplex_nf4_mma", sources=[str(source)], extra_cuda_cflags=["-O3", "--use_fast_math"],
                verbose=False)


def is_available() -> bool:
    """True when the extension builds and the GPU has bf16 tensor cores (sm_80+)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        _extension()
    except Exception:  # a missing nvcc or a failed build: the Triton kernels serve instead
        log.exception("the CUDA NF4 kernel did not build; falling back to Triton")
        return False
    return True


def pick_split_k(num_rows: int, out_features: int, in_features: int, num_sms: int) -> int:
    """Split K until ~16 warps per SM are busy, keeping fp32 partials under 1/4 of the code bytes."""
    row_tiles = -(-out_features // 16)
    num_blocks = in_features // NF4_BLOCKSIZE
    cap = max(1, min(16, in_features // (32 * num_rows), num_blocks // 4))
    split_k = 1
    while split_k * 2 <= cap and row_tiles * split_k < 16 * num_sms:
        split_k *= 2
    return split_k


def nf4_mma(
    x: torch.Tensor,  # [T, in] bf16 / fp16, T <= 64
    codes: torch.Tensor,  # [out * in / 2, 1] uint8
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    split_k: int | None = None,
    warps: int = 4,
    num_sms: int = 132,
) -> torch.Tensor:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype."""
    out_features, in_features = shape
    x = x.contiguous()
    out = torch.empty(x.shape[0], out_features, device=x.device, dtype=x.dtype)
    if split_k is None:
        split_k = pick_split_k(x.shape[0], out_features, in_features, num_sms)
    _extension().nf4_mma(x, codes_as_bytes(codes), absmax_f, code_table, bias, out, split_k, warps)
    return out
