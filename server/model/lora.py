"""Adapters in a rank pool per targeted layer, applied per row of a mixed batch.

Every LoRA-capable (possibly fused) linear owns two preallocated pools of `capacity` rank units,
`lora_a [num_slices * capacity, in]` and `lora_b [capacity, out]` (B transposed, the adapter's scaling
folded in at load); `lora_meta.SlotLayout`, shared by all linears, says where each slot's adapter
starts and what rank it has. An adapter of rank r takes r units, not max_rank: where adapters go in the
pool is `server.engine.rank_pool`'s business. Loading an adapter is a `copy_` (no allocation, so
captured CUDA graphs stay valid). Slot -1 means "base model only". The batched op lives in `lora_ops`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from server.kernels.backends import triton_available
from server.kernels.host_device import to_device
from server.kernels.lora.lora_ops import LoraBatchMeta, SlotLayout, base_output, linear_with_lora
from server.model.lora_staging import element_offset, round_up, stage, tensors_to_device


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
        self.lora_a: torch.Tensor | None = None  # [num_slices * capacity, in]
        self.lora_b: torch.Tensor | None = None  # [capacity, out]
        self.layout: SlotLayout | None = None  # shared by every linear of the model

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.slice_offsets[-1]

    def pool_numels(self, capacity: int) -> tuple[int, int]:
        """Elements of lora_a and lora_b for a pool of `capacity` rank units."""
        return len(self.slice_names) * capacity * self.in_features, capacity * self.out_features

    def attach_pool(self, flat: torch.Tensor, start: int, capacity: int, layout: SlotLayout) -> int:
        """Make lora_a and lora_b views of `flat` from element `start`; returns the element after them."""
        num_a, num_b = self.pool_numels(capacity)
        self.lora_a = flat[start : start + num_a].view(len(self.slice_names) * capacity, self.in_features)
        self.lora_b = flat[start + num_a : start + num_a + num_b].view(capacity, self.out_features)
        self.layout = layout
        return start + num_a + num_b

    def forward(self, x: torch.Tensor, lora: LoraContext | None = None, defer_sum: bool = False,
                defer_delta: bool = False, h: torch.Tensor | None = None):
        """base(x) plus the adapters' deltas. `defer_sum`: the base may return unsummed split-K partials
        (split_sums.SplitSums) when no adapter applies; with adapters the output is summed, except in the decode
        graphs with LORAPLEX_LORA_SIDE_EXPAND=2 (the partials then carry the adapters' delta). `defer_delta`: the
        caller's kernel adds a pending delta (pending_lora.PendingLora), which the decode graphs then leave to it
        under LORAPLEX_LORA_FUSED_ACT. `h`: the shrink's output, computed ahead by the kernel before
        (act_shrink), in a decode graph."""
        if lora is None or self.lora_a is None:
            return base_output(self.base, x, defer_sum)
        if lora.host_segments is not None and x.device.type == "cpu":
            y = self.base(x)
            self._apply_segments(y, x, lora.host_segments)
            return y
        return linear_with_lora(self.base, x, self.lora_a, self.lora_b, self.layout, lora.meta, self.slice_offsets,
                                defer_sum=defer_sum, defer_delta=defer_delta, h=h)

    def _apply_segments(self, y, x, segments) -> None:
        """Eager prefill path: one pair of matmuls per (sequence, slice)."""
        n = len(self.slice_names)
        for start, length, slot in segments:
            if slot < 0:
                continue
            o, r = self.layout.host_offsets[slot], self.layout.host_ranks[slot]
            rows = slice(start, start + length)
            h = x[rows] @ self.lora_a[n * o : n * (o + r)].t()  # [len, num_slices * r]
            for i in range(n):
                lo, hi = self.slice_offsets[i], self.slice_offsets[i + 1]
                y[rows, lo:hi] += h[:, i * r : (i + 1) * r] @ self.lora_b[o : o + r, lo:hi]

    def load_slot(self, offset: int, rank: int, layer: int, adapter) -> None:
        """Copy one adapter's A/B for this layer into the pool at `offset` as rank `rank` (zeros where it
        does not target or where a slice's own rank is smaller)."""
        n = len(self.slice_names)
        a_slot, b_slot = self.lora_a[n * offset : n * (offset + rank)], self.lora_b[offset : offset + rank]
        a_slot.zero_()
        b_slot.zero_()
        for i, name in enumerate(self.slice_names):
            pair = adapter.tensors.get((layer, name))
            if pair is None:
                continue
            # From pinned CPU memory these are asynchronous copies queued before the next forward on
            # the same stream: the engine thread does not wait for them. The cast and the scaling
            # happen on the device.
            # The file's dtype (bf16/fp16/fp32) travels; B is scaled in float32 and rounded once, into the slot.
            a, b = (t.to(a_slot.device, non_blocking=True) for t in pair)  # [r, in], [out_i, r]
            r = a.shape[0]
            lo, hi = self.slice_offsets[i], self.slice_offsets[i + 1]
            a_slot[i * rank : i * rank + r].copy_(a)
            b_slot[:r, lo:hi].copy_((b.float() * adapter.scaling).t())

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


_POOL_ALIGN = 64  # elements: each linear's pools start 128-byte aligned in the flat buffer (bf16)


def _pool_starts(model, capacity: int) -> list[int]:
    """Where each LoRA linear's pools start in the flat buffer (64-element aligned), then its end."""
    starts = [0]
    for _, linear in model.lora_linears():
        starts.append(round_up(starts[-1] + sum(linear.pool_numels(capacity)), _POOL_ALIGN))
    return starts


def max_adapter_rank(adapter) -> int:
    return max((a.shape[0] for a, _ in adapter.tensors.values()), default=0)


class LoraSlots:
    """The model's rank pools as one unit: allocate once, load adapters at an offset, by slot."""

    def __init__(self, model, capacity: int, max_rank: int, num_slots: int):
        self.model = model
        self.capacity = capacity
        self.max_rank = max_rank
        self.layout = SlotLayout.empty(num_slots, max_rank, model.device)
        self.unit_nbytes = self.rank_nbytes(model)  # device bytes of one rank unit across every linear
        # Every linear's pools are views of one flat buffer, each starting on a 64-element boundary, so
        # that one kernel can fill a slot in all of them (`triton_slot_load`).
        starts = _pool_starts(model, capacity)
        self.flat = torch.zeros(starts[-1], dtype=model.dtype, device=model.device)
        for (_, linear), start in zip(model.lora_linears(), starts[:-1], strict=True):
            linear.attach_pool(self.flat, start, capacity, self.layout)
        self._copy_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self._zero = torch.zeros(1, dtype=model.dtype, device=model.device)  # what the scatter zeroing reads
        # The scatter kernel fills a slot in a handful of launches (CUDA with Triton; LORAPLEX_SLOT_SCATTER=0
        # keeps the foreach path). On the H200 (tests/gpu/test_adapter_prefetch_gpu.py, 1B rank 16) it was
        # bit-equal to the per-linear reference in bf16 and fp16 and issued a load in 1.3-1.6 ms against
        # 1.9-2.5 for the foreach path; on the CPU (and under the interpreter) it is opt-in with =1.
        default = "1" if model.device.type == "cuda" and triton_available() else "0"
        self.use_scatter = os.environ.get("LORAPLEX_SLOT_SCATTER", default) == "1"

    def warm_up_copies(self) -> None:
        """Allocate once what a slot load allocates, so that no load allocates: the copy stream's staging block
        for the largest adapter (float32 sources, every linear at max_rank; the caching allocator keeps it
        for that stream and splits it for smaller loads) and pinned descriptor tables of every power-of-two
        size up to the largest. A precaution, not a measured fix: device and pinned allocations may wait
        for queued work, but the load that waited for the queued step on the H200 waited in
        `_foreach_zero_` (now gone), with these already warmed. It holds the block for good (about 0.7 GB
        at 8B, max_rank 64); the engine sizes the KV cache after this, with the block counted. CUDA only."""
        if self._copy_stream is None:
            return
        from server.kernels.lora.triton_slot_load import FIELDS

        element = torch.tensor([], dtype=self.model.dtype).element_size()
        tensors = sum(2 * len(linear.slice_names) for _, linear in self.model.lora_linears())
        largest = self.max_rank * self.unit_nbytes // element * 4 + 512 * (tensors + 1)
        with torch.cuda.stream(self._copy_stream):
            torch.empty(largest, dtype=torch.uint8, device=self.model.device)
            size = 1
            while size < 2 * tensors * FIELDS:
                to_device([0] * size, torch.int64, self.model.device)
                size *= 2
        self._copy_stream.synchronize()

    @property
    def is_async(self) -> bool:
        """Whether `load` returns before the copy is done (CUDA: a side stream), leaving an event to poll."""
        return self._copy_stream is not None

    def load(self, slot: int, offset: int, adapter) -> torch.cuda.Event | None:
        """Copy one adapter into the pools at `offset` and point `slot` there. On CUDA the copies run on a
        side stream, ordered after the work already queued on the compute stream (which may still read
        what was there before), and the returned event marks their end: the slot must not be read before
        `event.query()` is True. The running batch keeps decoding meanwhile. On the CPU the copy is done
        on return (None)."""
        rank = max_adapter_rank(adapter)
        if rank > self.max_rank:
            raise ValueError(f"adapter rank {rank} exceeds max_rank {self.max_rank}")
        if not 0 <= offset <= self.capacity - rank:
            raise ValueError(f"rank {rank} at offset {offset} does not fit a pool of {self.capacity}")
        if self._copy_stream is None:
            self._copy_into(slot, offset, rank, adapter)
            return None
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(self._copy_stream):
            self._copy_into(slot, offset, rank, adapter)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return done

    def _copy_into(self, slot: int, offset: int, rank: int, adapter) -> None:
        if self.use_scatter and all(t.is_contiguous() for pair in adapter.tensors.values() for t in pair):
            self._scatter_into(offset, rank, adapter)
            self.layout.set(slot, offset, rank)
            return
        self._foreach_into(offset, rank, adapter)
        self.layout.set(slot, offset, rank)

    def _scatter_into(self, offset: int, rank: int, adapter) -> None:
        """The slot load as one descriptor per tensor and one `triton_slot_load.scatter` per source dtype,
        after one scatter launch that zeroes the slot's rows."""
        from server.kernels.lora import triton_slot_load

        device = self.model.device
        staging, locate = stage(adapter.tensors, device)
        zeros, descriptors, largest = [], {}, {}
        for layer, linear in self.model.lora_linears():
            n, in_features, out_features = len(linear.slice_names), linear.in_features, linear.out_features
            a_start = linear.lora_a.storage_offset() + n * offset * in_features
            b_start = linear.lora_b.storage_offset() + offset * out_features
            zeros += [(a_start, n * rank * in_features), (b_start, rank * out_features)]
            for i, name in enumerate(linear.slice_names):
                pair = adapter.tensors.get((layer, name))
                if pair is None:
                    continue
                a, b = pair
                r = a.shape[0]
                lo, hi = linear.slice_offsets[i], linear.slice_offsets[i + 1]
                # A [r, in] -> rows i*rank.. of the slot's A; B [out_i, r] -> the slot's B rows, transposed.
                for t, row in ((a, (a_start + i * rank * in_features, r, in_features, in_features, in_features,
                                    1, 0)),
                               (b, (b_start + lo, r, hi - lo, out_features, 1, r, 1))):
                    descriptors.setdefault(t.dtype, []).append((element_offset(t, locate),) + row)
                    largest[t.dtype] = max(largest.get(t.dtype, 0), t.numel())
        # The slot's rows are zeroed by the same kernel reading one zero (strides 0), not by _foreach_zero_: a
        # foreach op's tensor-list metadata crossed to the device in a way that waited for the stream, and the copy
        # stream waits for the compute stream, so the engine thread blocked for the queued step (the H200 test
        # saw 100 ms of host time in it behind 0.1 s of queued work). One launch for the zeros, then the copies.
        # Every descriptor table crosses in one pinned copy: one pinned block a load, so a load never waits for
        # another block of its own size class to come back from the copy stream.
        groups = [[(0, start, 1, length, length, 0, 0, 0) for start, length in zeros]] + list(descriptors.values())
        tables = to_device([v for rows in groups for row in rows for v in row], torch.int64, device)
        tables = tables.view(-1, triton_slot_load.FIELDS).split([len(rows) for rows in groups])
        triton_slot_load.scatter(self._zero, self.flat, tables[0], max(length for _, length in zeros), 1.0)
        for table, dtype in zip(tables[1:], descriptors, strict=True):
            triton_slot_load.scatter(staging.view(dtype), self.flat, table, largest[dtype], adapter.scaling)

    def _foreach_into(self, offset: int, rank: int, adapter) -> None:
        """The slot load, batched: what `LoraLinear.load_slot` does linear by linear (the reference), in a
        handful of calls for the whole adapter. The per-linear loop issued about 57 tensor ops per layer
        (zeroing, a host copy of each tensor, cast, scaling, transposition), 35-45 ms of the engine thread
        for an 8B rank-16 adapter on the H200, during which no step ran. Here each host buffer the
        tensors live in (the CPU tier's pinned pages: server.pinned_pages) crosses to the device once,
        and the zeroing, the A copies, B's scaling and the B copies are one foreach call each. The values
        are the reference's bit for bit: B is scaled in float32 (or in its own dtype when that is the
        slot's: the same float32 product, rounded once) and rounded once into the slot."""
        device, dtype = self.model.device, self.model.dtype
        on_device = tensors_to_device(adapter.tensors, device)
        zeros, a_dst, a_src, b_dst, b_src = [], [], [], [], []
        for layer, linear in self.model.lora_linears():
            n = len(linear.slice_names)
            a_slot, b_slot = linear.lora_a[n * offset : n * (offset + rank)], linear.lora_b[offset : offset + rank]
            zeros += [a_slot, b_slot]
            for i, name in enumerate(linear.slice_names):
                pair = on_device.get((layer, name))
                if pair is None:
                    continue
                a, b = pair
                r = a.shape[0]
                lo, hi = linear.slice_offsets[i], linear.slice_offsets[i + 1]
                a_dst.append(a_slot[i * rank : i * rank + r])
                a_src.append(a)
                b_dst.append(b_slot[:r, lo:hi])
                b_src.append(b if b.dtype in (torch.float32, dtype) else b.float())
        torch._foreach_zero_(zeros)
        if a_dst:
            torch._foreach_copy_(a_dst, a_src)
            scaled = torch._foreach_mul(b_src, adapter.scaling)
            torch._foreach_copy_(b_dst, [b.t() for b in scaled])

    @staticmethod
    def rank_nbytes(model) -> int:
        """Device bytes of one rank unit across every LoRA linear of `model` (a row of A per slice, one of B)."""
        element = torch.tensor([], dtype=model.dtype).element_size()
        return sum((len(lin.slice_names) * lin.in_features + lin.out_features) * element
                   for _, lin in model.lora_linears())

    @property
    def nbytes(self) -> int:
        """Device bytes the pools take: the flat buffer, alignment padding included."""
        return self.flat.numel() * self.flat.element_size()

    @staticmethod
    def pool_nbytes(model, capacity: int) -> int:
        """Device bytes of the pools of `capacity` rank units: the flat buffer, alignment padding included
        (none when every pool's size is a multiple of 64 elements, as in real model shapes)."""
        return _pool_starts(model, capacity)[-1] * torch.tensor([], dtype=model.dtype).element_size()
