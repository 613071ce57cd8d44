"""An adapter laid out exactly as its block of the GPU rank pools, made on the CPU ahead of its slot load.

Loading an adapter into a slot used to copy, cast and scale it tensor by tensor on the engine thread:
for every LoRA linear two zero fills, then per slice two host-to-device copies, a cast, a float32
scaling and a transposed copy, about 900 kernel launches for a 1B adapter on all seven linears (the
Python side of them several milliseconds), between two decode steps. A `SlotImage` does that work once,
on the thread that read the adapter from disk: per linear, the A rows `[num_slices * rank, in]` and
`B^T * scaling` `[rank, out]` in the model's dtype, zeros where the adapter does not target a slice or
a slice's rank is smaller, each block in its own pinned buffer (CUDA). A slot load is then one
asynchronous copy per block: 128 for the 1B shape.

Bit for bit what the per-tensor path wrote: A is cast from the file's dtype, and B is scaled in
float32 and rounded once to the model's dtype, on the CPU instead of the GPU (both round to nearest even).
Blocks are pinned one by one rather than as one buffer: PyTorch's pinned allocator rounds every
allocation up to a power of two, and most blocks (rank x a power-of-two width) are one already, while a
whole adapter is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearSpec:
    """What a slot image needs to know of one LoRA linear of the model."""

    layer: int
    slice_names: tuple[str, ...]
    slice_offsets: tuple[int, ...]  # output columns of each slice: [offsets[i], offsets[i + 1])
    in_features: int


@dataclass
class SlotImage:
    """Per LoRA linear (in `model.lora_linears()` order): (A rows [num_slices * rank, in], B^T [rank, out])."""

    rank: int
    dtype: torch.dtype
    specs: tuple[LinearSpec, ...]  # the model it was made for
    blocks: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.blocks)


def linear_specs(model) -> tuple[LinearSpec, ...]:
    return tuple(LinearSpec(layer, linear.slice_names, linear.slice_offsets, linear.in_features)
                 for layer, linear in model.lora_linears())


def adapter_rank(adapter) -> int:
    """The rank of the adapter's slot: its largest A."""
    return max((a.shape[0] for a, _ in adapter.tensors.values()), default=0)


def build_slot_image(specs: tuple[LinearSpec, ...], adapter, dtype: torch.dtype, pin: bool) -> SlotImage:
    """The adapter's pool block for every linear of `specs` (see the module docstring)."""
    rank = adapter_rank(adapter)
    blocks = []
    for spec in specs:
        n = len(spec.slice_names)
        a_block = torch.zeros(n * rank, spec.in_features, dtype=dtype, pin_memory=pin)
        b_block = torch.zeros(rank, spec.slice_offsets[-1], dtype=dtype, pin_memory=pin)
        for i, name in enumerate(spec.slice_names):
            pair = adapter.tensors.get((spec.layer, name))
            if pair is None:
                continue
            a, b = pair  # [r, in], [out_i, r]
            r = a.shape[0]
            lo, hi = spec.slice_offsets[i], spec.slice_offsets[i + 1]
            a_block[i * rank : i * rank + r].copy_(a)
            b_block[:r, lo:hi].copy_((b.float() * adapter.scaling).t())
        blocks.append((a_block, b_block))
    return SlotImage(rank, dtype, specs, blocks)
