"""A linear layer's output left as unsummed split-K partials, for the glue kernel that reads it to sum.

The CUDA NF4 kernels split K across blocks when the rows of one weight cannot fill the GPU (cuda_nf4.pick_split_k):
each split stores fp32 partials [splits, M, N] and a second kernel sums them in split order, adds the bias and
rounds once. At one row every 8B linear splits 16 ways: 128 sum launches a decode step, 0.17 ms of the batch-1
step's 3.33 ms of kernels, plus the gaps between launches (bench/NOTES.md, thirteenth session). A caller that
passes `defer_sum=True` gets the partials in a `SplitSums` instead, and the kernel that reads the output
(glue_ops.silu_mul, glue_ops.qkv_rotary_write_kv) sums them itself, in the same order with the same single
rounding, so the values are bit for bit those of the sum kernel. Only kernels with a wide grid take partials: the
residual add and norm that read o_proj's and down_proj's outputs run one program per row, and 16 planes of a
4,096-wide row are 256 KB for one SM to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitSums:
    """out[m, n] = rounded(sum over s in order of partials[s, m, n], plus bias[n]), not yet computed; with `delta`,
    then rounded(out[m, n] + delta[m, n]) in fp32: a LoRA linear's per-token delta computed beside the base matmul
    (lora_ops.SIDE_EXPAND; rows of tokens without an adapter hold -0.0, which adds nothing to any value, signed zeros
    included). Only the kernels that say so add a delta (triton_glue._source)."""

    partials: torch.Tensor  # [splits, M, N] float32, contiguous
    bias: torch.Tensor | None  # [N] in dtype
    dtype: torch.dtype  # the output's
    delta: torch.Tensor | None = None  # [M, N] float32, contiguous

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.partials.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.partials.device

    def materialize(self) -> torch.Tensor:
        """The output tensor [M, N], summed as the CUDA sum kernel sums (from 0, split by split, then the bias)."""
        total = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        for part in self.partials:
            total += part
        if self.bias is not None:
            total += self.bias.float()
        out = total.to(self.dtype)
        return out if self.delta is None else (out.float() + self.delta).to(self.dtype)


def materialized(y) -> torch.Tensor:
    """y itself if a tensor, else the output it stands for (SplitSums, pending_lora.PendingLora)."""
    return y if isinstance(y, torch.Tensor) else y.materialize()
