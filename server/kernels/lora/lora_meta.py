"""Per-step metadata of batched multi-adapter LoRA and its shape checks: shared by the dispatch
(lora_ops) and the Triton backend (triton_lora), which never imports the dispatch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from server.kernels.host_device import to_device


@dataclass
class LoraBatchMeta:
    """Device-side per-step LoRA metadata. Tokens are laid out in segments; every token of segment g
    uses slot seg_slots[g]."""

    seg_starts: torch.Tensor  # [num_segments + 1] int32, seg_starts[0] = 0, last = num_tokens
    seg_slots: torch.Tensor  # [num_segments] int32, -1 = base only (no adapter)
    token_slots: torch.Tensor  # [num_tokens] int32, same info per token (derived once per step)
    max_seg_len: int  # static upper bound on a segment's length (1 for decode)
    # The shrink takes a segment's tile a program on tensor cores (A read once a tile), not a program a token as
    # triton_lora chooses for short segments: a tiled replay's prompt chunks (cuda_graphs.lora_tiles).
    shrink_tiles: bool = False

    @property
    def num_segments(self) -> int:
        return self.seg_slots.shape[0]

    def one_token_segments(self, num_tokens: int) -> bool:
        """Each of the num_tokens tokens its own segment, in token order: a decode step's metadata."""
        return self.max_seg_len == 1 and self.num_segments == num_tokens


_INTS_PER_16_BYTES = 4


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
    # Each part starts on a 16-byte boundary (4 int32s): Triton builds a kernel variant per pointer
    # alignment, and split views at offsets that follow the number of prompts made the LoRA kernels of
    # an eager prefill meet new variants (0.3-0.8 s each on the H200) that no start-up warm-up could know.
    parts = [starts, list(seg_slots), token_slots]
    padded = [part + [0] * (-len(part) % _INTS_PER_16_BYTES) for part in parts]
    flat = to_device([v for part in padded for v in part], torch.int32, torch.device(device))
    views, offset = [], 0
    for part, pad in zip(parts, padded, strict=True):
        views.append(flat[offset : offset + len(part)])
        offset += len(pad)
    seg_starts, slots, tokens = views
    return LoraBatchMeta(seg_starts=seg_starts, seg_slots=slots, token_slots=tokens,
                         max_seg_len=max(seg_lens, default=0))


def decode_lora_meta(slots: torch.Tensor) -> LoraBatchMeta:
    """Metadata for a decode step (one token per segment) from device slots [B] int32; no host sync."""
    slots = slots.to(torch.int32)
    starts = torch.arange(slots.shape[0] + 1, dtype=torch.int32, device=slots.device)
    return LoraBatchMeta(seg_starts=starts, seg_slots=slots, token_slots=slots, max_seg_len=1)


@dataclass
class SlotLayout:
    """Where each slot's adapter sits in the rank pools of every LoRA linear (one layout per model).

    A linear's pools hold `capacity` rank units (the same count for every linear):
      lora_a [num_slices * capacity, in]: slot s, at `offset` with rank r, owns rows
             [num_slices * offset, num_slices * (offset + r)); slice i's A is the r rows from
             num_slices * offset + i * r.
      lora_b [capacity, out]: B transposed, scaling folded in; slot s owns rows [offset, offset + r),
             output columns slice_offsets[i]:[i+1] belong to slice i.
    So an adapter of rank 8 takes an eighth of the bytes of one of rank 64: no padding to max_rank.
    `offsets`/`ranks` are read on the device by the kernels (static addresses, so captured CUDA graphs
    stay valid when a slot is reloaded); the host lists mirror them for the eager CPU path.
    """

    offsets: torch.Tensor  # [num_slots] int32
    ranks: torch.Tensor  # [num_slots] int32, 0 = empty
    max_rank: int  # the largest rank a slot may have (sizes the kernels' tiles and scratch)
    host_offsets: list[int]
    host_ranks: list[int]

    @classmethod
    def empty(cls, num_slots: int, max_rank: int, device: torch.device | str) -> SlotLayout:
        zeros = torch.zeros(num_slots, dtype=torch.int32, device=device)
        return cls(zeros, zeros.clone(), max_rank, [0] * num_slots, [0] * num_slots)

    @classmethod
    def from_lists(cls, offsets: list[int], ranks: list[int], max_rank: int,
                   device: torch.device | str) -> SlotLayout:
        layout = cls.empty(len(offsets), max_rank, device)
        for slot, (offset, rank) in enumerate(zip(offsets, ranks, strict=True)):
            layout.set(slot, offset, rank)
        return layout

    @property
    def num_slots(self) -> int:
        return len(self.host_ranks)

    def set(self, slot: int, offset: int, rank: int) -> None:
        """Point `slot` at `offset` with `rank` (on CUDA: two fill kernels on the current stream)."""
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside 0..{self.max_rank}")
        self.host_offsets[slot], self.host_ranks[slot] = offset, rank
        self.offsets[slot].fill_(offset)
        self.ranks[slot].fill_(rank)


def check_lora_shapes(y, x, lora_a, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
                      slice_offsets: tuple[int, ...]) -> int:
    """Validate shapes; return the number of slices."""
    num_slices = len(slice_offsets) - 1
    if num_slices < 1 or slice_offsets[0] != 0 or slice_offsets[-1] != y.shape[1]:
        raise ValueError(f"slice_offsets {slice_offsets} must run from 0 to out={y.shape[1]}")
    if any(lo > hi for lo, hi in itertools.pairwise(slice_offsets)):
        raise ValueError(f"slice_offsets {slice_offsets} must be non-decreasing")
    capacity = lora_b.shape[0]
    if lora_a.shape != (num_slices * capacity, x.shape[1]):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} does not match {num_slices} slices of a "
                         f"{capacity}-rank pool over in={x.shape[1]}")
    if lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match y's {y.shape[1]} columns")
    if x.shape[0] != y.shape[0] or meta.token_slots.shape[0] != x.shape[0]:
        raise ValueError("x, y and meta.token_slots must have the same number of tokens")
    if layout.offsets.shape != layout.ranks.shape:
        raise ValueError("layout offsets and ranks differ in length")
    return num_slices
