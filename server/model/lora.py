"""Adapters in fixed slots per targeted layer, applied per row of a mixed batch.

Every LoRA-capable (possibly fused) linear owns preallocated slot tensors:
`lora_a [max_slots, num_slices * max_rank, in]` and `lora_b [max_slots, out, max_rank]`, with the
adapter's scaling folded into B at load. Loading an adapter into a slot is a `copy_` (no allocation,
so captured CUDA graphs stay valid); smaller ranks are zero-padded, which contributes nothing.
Slot -1 means "base model only". The batched op itself lives in `lora_ops`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.model.lora_ops import LoraBatchMeta, lora_apply


@dataclass
class LoraContext:
    """LoRA metadata for one step: device-side meta, plus host segments when the step is eager."""

    meta: LoraBatchMeta
    host_segments: list[tuple[int, int, int]] | None = None  # (start, length, slot), prefill only


class LoraLinear(nn.Module):
    """A frozen base linear plus slot-stacked adapters on its output slices (q|k|v, gate|up, ...)."""

    def __init__(self, base: nn.Module, slice_names: tuple[str, ...], slice_widths: list[int]):
        super().__init__()
        self.base = base
        self.slice_names = tuple(slice_names)
        offsets = [0]
        for width in slice_widths:
            offsets.append(offsets[-1] + width)
        self.slice_offsets = tuple(offsets)
        self.lora_a: torch.Tensor | None = None  # [max_slots, num_slices * max_rank, in]
        self.lora_b: torch.Tensor | None = None  # [max_slots, out, max_rank]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.slice_offsets[-1]

    def allocate_slots(self, max_slots: int, max_rank: int, dtype: torch.dtype, device) -> None:
        n = len(self.slice_names)
        self.lora_a = torch.zeros(max_slots, n * max_rank, self.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_slots, self.out_features, max_rank, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, lora: LoraContext | None = None) -> torch.Tensor:
        y = self.base(x)
        if lora is None or self.lora_a is None:
            return y
        if lora.host_segments is not None and x.device.type == "cpu":
            self._apply_segments(y, x, lora.host_segments)
        else:
            lora_apply(y, x, self.lora_a, self.lora_b, lora.meta, self.slice_offsets)
        return y

    def _apply_segments(self, y, x, segments) -> None:
        """Eager prefill path: one pair of matmuls per (sequence, slice)."""
        rank = self.lora_b.shape[-1]
        for start, length, slot in segments:
            if slot < 0:
                continue
            rows = slice(start, start + length)
            h = x[rows] @ self.lora_a[slot].t()  # [len, num_slices * rank]
            for i in range(len(self.slice_names)):
                lo, hi = self.slice_offsets[i], self.slice_offsets[i + 1]
                y[rows, lo:hi] += h[:, i * rank : (i + 1) * rank] @ self.lora_b[slot, lo:hi].t()

    def load_slot(self, slot: int, layer: int, adapter) -> None:
        """Copy one adapter's A/B for this layer into `slot` (zeros where it does not target)."""
        rank = self.lora_b.shape[-1]
        a_slot, b_slot = self.lora_a[slot], self.lora_b[slot]
        a_slot.zero_()
        b_slot.zero_()
        for i, name in enumerate(self.slice_names):
            pair = adapter.tensors.get((layer, name))
            if pair is None:
                continue
            # From pinned CPU memory these are asynchronous copies queued before the next forward on
            # the same stream: the engine thread does not wait for them. The cast and the scaling
            # happen on the device.
            a, b = (t.to(a_slot.device, non_blocking=True) for t in pair)  # [r, in], [out_i, r]
            r = a.shape[0]
            lo, hi = self.slice_offsets[i], self.slice_offsets[i + 1]
            a_slot[i * rank : i * rank + r].copy_(a)
            b_slot[lo:hi, :r].copy_(b * adapter.scaling)

    def targets(self, layer: int, adapter) -> bool:
        """True if the adapter changes any slice of this layer's weight."""
        return any((layer, name) in adapter.tensors for name in self.slice_names)

    def add_delta_(self, weight: torch.Tensor, layer: int, adapter) -> None:
        """weight [out, in] += the adapter's B·A·scale, slice by slice, in place (merged mode).

        One fused GEMM per targeted slice (`addmm_`, fp32 accumulation inside), in the weight's own
        dtype: no float32 copy of the whole matrix is materialized.
        """
        for i, name in enumerate(self.slice_names):
            pair = adapter.tensors.get((layer, name))
            if pair is None:
                continue
            a, b = (t.to(weight.device, weight.dtype) for t in pair)
            lo, hi = self.slice_offsets[i], self.slice_offsets[i + 1]
            weight[lo:hi].addmm_(b, a, alpha=adapter.scaling)

    @property
    def base_device(self) -> torch.device:
        return next(self.base.parameters()).device


def max_adapter_rank(adapter) -> int:
    return max((a.shape[0] for a, _ in adapter.tensors.values()), default=0)


class LoraSlots:
    """The model's slot tensors as one unit: allocate once, load adapters into slots by index."""

    def __init__(self, model, max_slots: int, max_rank: int):
        self.model = model
        self.max_slots = max_slots
        self.max_rank = max_rank
        for _, linear in model.lora_linears():
            linear.allocate_slots(max_slots, max_rank, model.dtype, model.device)
        self._copy_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

    @property
    def is_async(self) -> bool:
        """Whether `load` returns before the copy is done (CUDA: a side stream), leaving an event to poll."""
        return self._copy_stream is not None

    def load(self, slot: int, adapter) -> torch.cuda.Event | None:
        """Copy one adapter into `slot`. On CUDA the copies run on a side stream, ordered after the work
        already queued on the compute stream (which may still read the slot's previous adapter), and the
        returned event marks their end: the slot must not be read before `event.query()` is True. The
        running batch keeps decoding meanwhile. On the CPU the copy is done on return (None)."""
        if max_adapter_rank(adapter) > self.max_rank:
            raise ValueError(f"adapter rank {max_adapter_rank(adapter)} exceeds max_rank {self.max_rank}")
        if self._copy_stream is None:
            self._copy_into(slot, adapter)
            return None
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(self._copy_stream):
            self._copy_into(slot, adapter)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return done

    def _copy_into(self, slot: int, adapter) -> None:
        for layer, linear in self.model.lora_linears():
            linear.load_slot(slot, layer, adapter)

    @staticmethod
    def slot_nbytes(model, max_rank: int) -> int:
        """Device bytes of one slot across every LoRA linear of `model` (A and B padded to max_rank)."""
        element = torch.tensor([], dtype=model.dtype).element_size()
        return sum(
            (len(lin.slice_names) * max_rank * lin.in_features + lin.out_features * max_rank) * element
            for _, lin in model.lora_linears()
        )

    @property
    def nbytes(self) -> int:
        return sum(
            lin.lora_a.numel() * lin.lora_a.element_size() + lin.lora_b.numel() * lin.lora_b.element_size()
            for _, lin in self.model.lora_linears()
        )
