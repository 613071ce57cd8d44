"""A LoRA linear's output whose per-token delta is not yet added, for the kernel that reads that output to add.

In a decode graph, gate_up's expand adds each token's delta into the base's output, and the activation kernel reads
that output back at once: with LORAPLEX_LORA_FUSED_ACT (lora_ops.FUSED_ACT) the expand's work moves into the
activation kernel instead (triton_glue.silu_mul), which reads the base output (or sums its split-K partials), adds
the delta computed as the one-row expand computes it (triton_lora._row_delta: the same products in the same order),
rounds as the expand rounds, and applies silu * up. One launch and one write and read of [T, 2I] fewer a layer, and
bit for bit the expand then the activation: `materialize` is that expand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.kernels.lora.lora_meta import LoraBatchMeta, SlotLayout
from server.kernels.split_sums import SplitSums


@dataclass(frozen=True)
class PendingLora:
    """base (the base layer's output [T, out], or its split-K partials) plus, for each token with an adapter, the
    delta of its slot's B rows [o, o + r) against its row of h (the shrink's output), slice by slice; not computed
    until a kernel reads it. Segments are one token each, in token order (a decode step's metadata)."""

    base: torch.Tensor | SplitSums
    h: torch.Tensor  # [T, num_slices * max_rank] float32, the shrink's output
    lora_b: torch.Tensor  # [capacity, out]
    layout: SlotLayout
    meta: LoraBatchMeta
    slice_offsets: tuple[int, ...]

    def __post_init__(self):
        if not self.meta.one_token_segments(self.base.shape[0]):
            raise ValueError("a pending LoRA delta takes one-token segments (a decode step's metadata)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.shape)

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def materialize(self) -> torch.Tensor:
        """The output [T, out] as the decode graph's unfused path computes it: the expand into the base output
        (lora_expand_sums when the base left partials). Triton kernels: CUDA, or the interpreter."""
        from server.kernels.lora.triton_lora import lora_expand
        from server.kernels.lora.triton_lora_decode import lora_expand_sums

        if isinstance(self.base, SplitSums):
            return lora_expand_sums(self.base, self.h, self.lora_b, self.layout, self.meta, self.slice_offsets)
        y = self.base.clone()
        lora_expand(y, self.h, self.lora_b, self.layout, self.meta, self.slice_offsets)
        return y
