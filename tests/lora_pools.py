"""Random LoRA rank pools for the kernel tests: mixed ranks, slots out of order, NaN where no slot owns."""

from __future__ import annotations

import torch

from server.kernels.lora.lora_meta import SlotLayout


def mixed_ranks(max_rank: int, num_slots: int) -> list[int]:
    """max_rank, then halves down to 1, cycling: every slot but the first has a rank below max_rank."""
    return [max(1, max_rank >> (s % 4)) for s in range(num_slots)]


def random_pool(ranks: list[int], max_rank: int, num_slices: int, in_features: int, out_features: int,
                dtype: torch.dtype, gen: torch.Generator, device="cpu"):
    """(lora_a, lora_b, layout): slots sit in reverse order with a one-unit gap before each, and every unit
    no slot owns holds NaN, so a path that reads past a slot's rank or outside its region shows it."""
    offsets, cursor = [0] * len(ranks), 0
    for slot in reversed(range(len(ranks))):
        offsets[slot] = cursor + 1
        cursor += 1 + ranks[slot]
    capacity = cursor + 1

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    lora_a = randn(num_slices * capacity, in_features, scale=in_features**-0.5)
    lora_b = randn(capacity, out_features, scale=max_rank**-0.5)
    owned = torch.zeros(capacity, dtype=torch.bool, device=device)
    for o, r in zip(offsets, ranks, strict=True):
        owned[o : o + r] = True
    lora_a[~owned.repeat_interleave(num_slices)] = float("nan")
    lora_b[~owned] = float("nan")
    return lora_a, lora_b, SlotLayout.from_lists(offsets, ranks, max_rank, device)
