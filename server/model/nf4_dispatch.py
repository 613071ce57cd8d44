"""Which kernel multiplies by an NF4 weight on CUDA, chosen by the rows (tokens) in the batch.

- ``gemv``: one row, the Triton GEMV (server.model.triton_nf4_gemv);
- ``fused``: few rows, the fused dequantize-in-registers Triton matmul (server.model.triton_nf4);
- ``dequant``: prefill-sized batches, dequantize into one reused 16-bit scratch buffer and let cuBLAS
  multiply (server.model.triton_nf4_dequant); the buffer holds one layer, never the whole model;
- ``bnb``: bitsandbytes' own ``matmul_4bit`` (``gemv_4bit`` at one row), kept as a measured fallback.

The crossovers come from ``python -m bench.kernels`` on an H200 (see bench/RESULTS.md);
``LORAPLEX_NF4_KERNEL=bnb`` sends every call to bitsandbytes.
"""

from __future__ import annotations

import os

import torch

from server.model.nf4_layout import codes_as_words

# (largest row count, kernel), scanned in order; None = any count.
KERNEL_BY_ROWS: tuple[tuple[int | None, str], ...] = ((1, "gemv"), (64, "fused"), (None, "dequant"))
if os.environ.get("LORAPLEX_NF4_KERNEL", "triton") == "bnb":
    KERNEL_BY_ROWS = ((None, "bnb"),)


def kernel_for_rows(num_rows: int, table=KERNEL_BY_ROWS) -> str:
    """The kernel name the dispatch uses for a batch of `num_rows` rows."""
    return next(name for max_rows, name in table if max_rows is None or num_rows <= max_rows)


class DequantScratch:
    """One 16-bit buffer per (device, dtype), grown to the largest layer it has held; never shrunk."""

    def __init__(self):
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buffer


SCRATCH = DequantScratch()  # process-wide: layers run one at a time, so one buffer serves them all


def nf4_linear_cuda(
    x: torch.Tensor,  # [T, in] bf16 / fp16, CUDA
    codes: torch.Tensor,  # [out * in / 2, 1] uint8
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None,  # [out]
    quant_state=None,  # bnb QuantState, for the bnb fallback
    kernel: str | None = None,  # force one kernel (benchmarks, tests)
) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias), semantics of nf4_ops.nf4_matmul_reference, by the fastest kernel."""
    name = kernel or kernel_for_rows(x.shape[0])
    out_features, in_features = shape
    if name == "gemv" and x.shape[0] == 1:
        from server.model import triton_nf4_gemv
        from server.model.triton_nf4 import device_num_sms

        out = torch.empty(1, out_features, device=x.device, dtype=x.dtype)
        return triton_nf4_gemv.nf4_gemv_triton(x.contiguous(), codes_as_words(codes), absmax_f, shape, code_table,
                                               out, bias=bias, num_sms=device_num_sms(x.device.index or 0))
    if name in ("fused", "gemv"):
        from server.model.triton_nf4 import nf4_matmul_triton

        return nf4_matmul_triton(x, codes, absmax_f, shape, code_table, bias=bias)
    if name == "dequant":
        from server.model.triton_nf4_dequant import nf4_dequantize_triton

        scratch = SCRATCH.get(out_features * in_features, x.device, x.dtype)
        weight = nf4_dequantize_triton(codes_as_words(codes), absmax_f, code_table, scratch)
        return torch.nn.functional.linear(x, weight.view(out_features, in_features), bias)
    if name == "bnb":
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, codes.t(), quant_state, bias=bias)
    raise ValueError(f"unknown NF4 kernel {name!r}")
