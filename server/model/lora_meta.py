"""Per-step metadata of batched multi-adapter LoRA and its shape checks: shared by the dispatch
(lora_ops) and the Triton backend (triton_lora), which never imports the dispatch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from server.model.host_device import to_device


@dataclass
class LoraBatchMeta:
    """Device-side per-step LoRA metadata. Tokens are laid out in segments; every token of segment g
    uses slot seg_slots[g]."""

    seg_starts: torch.Tensor  # [num_segments + 1] int32, seg_starts[0] = 0, last = num_tokens
    seg_slots: torch.Tensor  # [num_segments] int32, -1 = base only (no adapter)
    token_slots: torch.Tensor  # [num_tokens] int32, same info per token (derived once per step)
    max_seg_len: int  # static upper bound on a segment's length (1 for decode)

    @property
    def num_segments(self) -> int:
        return self.seg_slots.shape[0]


def make_lora_meta(seg_lens: list[int], seg_slots: list[int], device: torch.device | str) -> LoraBatchMeta:
    """Build metadata from host lists: one asynchronous host-to-device copy, no stream sync."""
    if len(seg_lens) != len(seg_slots):
        raise ValueError(f"{len(seg_lens)} segment lengths but {len(seg_slots)} segment slots")
    if any(n < 0 for n in seg_lens):
        raise ValueError("segment lengths must be >= 0")
    starts = [0]
    for n in seg_lens:
        starts.append(starts[-1] + n)
    token_slots = [s for n, s in zip(seg_lens, seg_slots, strict=True) for _ in range(n)]
    flat = to_device(starts + list(seg_slots) + token_slots, torch.int32, torch.device(device))
    seg_starts, slots, tokens = flat.split([len(starts), len(seg_slots), len(token_slots)])
    return LoraBatchMeta(seg_starts=seg_starts, seg_slots=slots, token_slots=tokens,
                         max_seg_len=max(seg_lens, default=0))


def decode_lora_meta(slots: torch.Tensor) -> LoraBatchMeta:
    """Metadata for a decode step (one token per segment) from device slots [B] int32; no host sync."""
    slots = slots.to(torch.int32)
    starts = torch.arange(slots.shape[0] + 1, dtype=torch.int32, device=slots.device)
    return LoraBatchMeta(seg_starts=starts, seg_slots=slots, token_slots=slots, max_seg_len=1)


def check_lora_shapes(y, x, lora_a, lora_b, meta: LoraBatchMeta, slice_offsets: tuple[int, ...]) -> int:
    """Validate shapes; return the rank R."""
    num_slices = len(slice_offsets) - 1
    if num_slices < 1 or slice_offsets[0] != 0 or slice_offsets[-1] != y.shape[1]:
        raise ValueError(f"slice_offsets {slice_offsets} must run from 0 to out={y.shape[1]}")
    if any(lo > hi for lo, hi in itertools.pairwise(slice_offsets)):
        raise ValueError(f"slice_offsets {slice_offsets} must be non-decreasing")
    rank = lora_b.shape[2]
    if lora_a.shape[1:] != (num_slices * rank, x.shape[1]):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} does not match {num_slices} slices of rank {rank}")
    if lora_b.shape[:2] != (lora_a.shape[0], y.shape[1]):
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match lora_a and y")
    if x.shape[0] != y.shape[0] or meta.token_slots.shape[0] != x.shape[0]:
        raise ValueError("x, y and meta.token_slots must have the same number of tokens")
    return rank
