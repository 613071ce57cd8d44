"""Which kernel multiplies by an NF4 weight on CUDA, chosen by the rows (tokens) in the batch.

- ``gemv``: one row, the Triton GEMV (server.model.triton_nf4_gemv);
- ``fused``: few rows, the fused dequantize-in-registers Triton matmul (server.model.triton_nf4);
- ``dequant``: prefill-sized batches, dequantize into one reused 16-bit scratch buffer and let cuBLAS
  multiply (server.model.triton_nf4_dequant); the buffer holds one layer, never the whole model;
- ``mma``: 1-64 rows, the CUDA tensor-core kernel compiled at first use (server.model.cuda_nf4);
- ``bnb``: bitsandbytes' own ``matmul_4bit`` (``gemv_4bit`` at one row), kept as a measured fallback.

The crossovers come from ``python -m bench.kernels`` on an H200 (see bench/RESULTS.md);
``LORAPLEX_NF4_KERNEL=bnb`` sends every call to bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from server.model.nf4_layout import codes_as_words

# (largest row count, kernel), scanned in order; None = any count. From the H200 run
# bench/results/2026-12-01-nvidia-h200-kernels.json (geometric mean over the 8B layer shapes, time over
# bf16 cuBLAS): 1-2 rows bnb 0.92 / 1.41 (our GEMV 1.41 at one row, fused 1.72); 3-32 rows fused
# 1.69-2.11 (word layout; bnb 2.5-3.0, dequant 2.2); from 33 rows dequant + cuBLAS 2.18 at 64 rows
# down to 1.90 at 256 (fused 3.2-6.9, bnb 3.0). At 1B shapes dequant already wins from 16 rows.
# bnb's one-row GEMV is the fastest today but not exact to the fp32 semantics (max error 4.9e-3 of the
# output's range against 3.3e-3 for ours, same run).
KERNEL_BY_ROWS: tuple[tuple[int | None, str], ...] = ((2, "bnb"), (32, "fused"), (None, "dequant"))
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
        from server.model.triton_nf4 import device_num_sms, nf4_matmul_triton, pick_config

        config = pick_config(x.shape[0], out_features, in_features, device_num_sms(x.device.index or 0))
        if x.shape[0] > 16:  # the word layout measured faster at 32 rows (2.11 vs 2.45), equal below
            config = dataclasses.replace(config, layout="words")
        return nf4_matmul_triton(x, codes, absmax_f, shape, code_table, bias=bias, config=config)
    if name == "mma":
        from server.model import cuda_nf4
        from server.model.triton_nf4 import device_num_sms

        return cuda_nf4.nf4_mma(x, codes, absmax_f, shape, code_table, bias,
                                num_sms=device_num_sms(x.device.index or 0))
    if name == "dequant":
        from server.model.triton_nf4_dequant import nf4_dequantize_triton

        scratch = SCRATCH.get(out_features * in_features, x.device, x.dtype)
        weight = nf4_dequantize_triton(codes_as_words(codes), absmax_f, code_table, scratch)
        return torch.nn.functional.linear(x, weight.view(out_features, in_features), bias)
    if name == "bnb":
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, codes.t(), quant_state, bias=bias)
    raise ValueError(f"unknown NF4 kernel {name!r}")
