"""Linear layers over a frozen base weight: NF4 (bitsandbytes 4-bit) or dense 16/32-bit.

Both expose the same small surface the model, the LoRA slots and the merged swap need:
`forward(x)`, `dequantize(dtype)` (float32 by default), `load_weight(w)` (in-place, no reallocation, so
captured CUDA graphs stay valid) and `state_tensors()` (the exact stored representation).
"""

from __future__ import annotations

import torch
from torch import nn

NF4_BLOCKSIZE = 64


class DenseLinear(nn.Module):
    """y = x @ W^T (+ b) with W kept in the compute dtype."""

    is_quantized = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, defer_sum: bool = False) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype, copy=True)

    def load_weight(self, weight: torch.Tensor) -> None:
        self.weight.data.copy_(weight.to(self.weight.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.data}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], derive: bool = True) -> None:
        self.weight.data.copy_(tensors["weight"])  # no forward copies to derive


class NF4Linear(nn.Module):
    """y = x @ dequant(W)^T (+ b) with W stored as bitsandbytes NF4 codes, double-quantized absmax."""

    is_quantized = True
    may_defer_sum = True  # forward(x, defer_sum=True) may return split_sums.SplitSums (lora_ops.linear_with_lora)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = dtype
        codes, state = _quantize(weight, dtype)
        self.codes = nn.Parameter(codes, requires_grad=False)  # [out * in / 2, 1] uint8, two codes a byte
        self.quant_state = state
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self._cpu_weight: torch.Tensor | None = None  # [out, in] dequantized once, CPU only
        # float32 per-64-block scales with double quant undone, for the fused Triton kernel; derived
        # from (absmax, absmax2, offset) and refreshed in place whenever those change.
        self.absmax_f = self._derive_absmax() if self.codes.is_cuda else None  # [out * in / 64]
        # The CUDA tile kernel's forward-only copy of (codes, absmax_f) in MMA-lane order
        # (nf4_layout.tile_pack), rebuilt in place with absmax_f: + 0.5625 byte/param on the GPU.
        self.tiled = self._derive_tiled() if self.codes.is_cuda else None

    def _derive_tiled(self, out=None):
        from server.kernels.nf4.nf4_layout import tile_pack

        return tile_pack(self.codes.data, self.absmax_f, (self.out_features, self.in_features), out=out)

    def _derive_absmax(self) -> torch.Tensor:
        from server.kernels.nf4.nf4_ops import nf4_absmax_float

        return nf4_absmax_float(self.quant_state).float().contiguous()

    def forward(self, x: torch.Tensor, defer_sum: bool = False):
        """The output [T, out]; with `defer_sum`, on CUDA, maybe its unsummed split-K partials (split_sums)."""
        if self.codes.device.type == "cpu":
            # bitsandbytes' CPU path dequantizes on every call (~10 ms for a 1.7M-parameter matrix on
            # 2 cores, 8x a dense matmul). On the CPU we dequantize once per weight change instead;
            # the result is the same dequantize-then-matmul, and the NF4 codes stay the truth.
            if self._cpu_weight is None:
                self._cpu_weight = self.dequantize().to(self.compute_dtype)
            return nn.functional.linear(x, self._cpu_weight, self.bias)
        from server.kernels.nf4.nf4_ops import nf4_matmul  # kernels by rows, measured crossovers (nf4_dispatch)

        shape = (self.out_features, self.in_features)
        return nf4_matmul(x, self.codes, self.absmax_f, shape, self.quant_state.code, bias=self.bias,
                          quant_state=self.quant_state, tiled=self.tiled, defer_sum=defer_sum)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.codes.data, self.quant_state).to(dtype)

    def load_weight(self, weight: torch.Tensor) -> None:
        """Requantize `weight` into the existing buffers (same storage, same QuantState object)."""
        self.load_state_tensors(_quantized_state_tensors(weight, self.compute_dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return _state_tensors(self.codes.data, self.quant_state)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], derive: bool = True) -> None:
        """Copy a saved exact representation back in place. `derive` False leaves the forward's copies (absmax_f,
        tiled) stale, for a caller that requantizes next (load_weight rebuilds them): the layer must not run until
        then."""
        for name, live in self.state_tensors().items():
            live.copy_(tensors[name])
        self._cpu_weight = None
        if derive and self.absmax_f is not None:
            self.absmax_f.copy_(self._derive_absmax())
            self._derive_tiled(out=self.tiled)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())


def _quantize(weight: torch.Tensor, dtype: torch.dtype):
    from bitsandbytes.functional import quantize_4bit

    return quantize_4bit(
        weight.to(dtype).contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )


def _quantized_state_tensors(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What _quantize gives, as the tensors _state_tensors names, without one host sync: bitsandbytes'
    quantize_4bit builds its 16-value code table with `torch.tensor(..., device=...)` on every call, a copy from
    pageable host memory that waits for the stream, so each requantized layer of a merged swap stopped the host
    until the GPU had caught up, and the next layer's launches could not run ahead. The same operations in the same
    order as quantize_4bit (NF4, blocks of 64, absmax double-quantized in blocks of 256 after subtracting its mean):
    the same bits (tests/unit/test_merge_exact.py compares them)."""
    from bitsandbytes.functional import quantize_blockwise

    codes, absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight.to(dtype).contiguous(), NF4_BLOCKSIZE, "nf4",
                                                                  torch.uint8)
    offset = absmax.mean()
    absmax_q, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    return {"codes": codes, "absmax": absmax_q, "offset": offset, "absmax2": state2.absmax}


def _state_tensors(codes: torch.Tensor, state) -> dict[str, torch.Tensor]:
    tensors = {"codes": codes, "absmax": state.absmax}
    if state.nested:
        tensors["offset"] = state.offset
        tensors["absmax2"] = state.state2.absmax
    return tensors


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, quantize: bool
) -> DenseLinear | NF4Linear:
    """Build the base linear layer for one (possibly fused) projection."""
    cls = NF4Linear if quantize else DenseLinear
    return cls(weight, bias, dtype)
