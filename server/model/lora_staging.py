"""Adapter tensors from host memory to the device for a slot load: one device buffer holding the spans of host
memory the tensors occupy (from pinned memory: asynchronous copies on the current stream), and each tensor's
place in it. `server.model.lora.LoraSlots` loads slots from it, by the scatter kernel or by foreach copies."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def stage(tensors: dict, device: torch.device) -> tuple[torch.Tensor, Callable[[torch.Tensor], int]]:
    """One device buffer (uint8) holding the host memory the tensors occupy, and a function giving the
    byte where a tensor begins in it. The tensors of one host buffer are copied as spans (tensors that
    touch or overlap merged), not as the whole buffer: the CPU tier's pages are views of slabs of up to
    1 GiB (server.pinned_pages.PagePool). Each span keeps its host address's alignment modulo 256, so a
    tensor aligned for its dtype in host memory is aligned on the device. From pinned memory the copies
    are asynchronous, on the current stream."""
    storages: dict[int, torch.UntypedStorage] = {}
    ranges: dict[int, list[tuple[int, int]]] = {}
    for pair in tensors.values():
        for t in pair:
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage)
            begin = t.storage_offset() * t.element_size()
            ranges.setdefault(storage.data_ptr(), []).append((begin, begin + extent_bytes(t)))
    spans: dict[int, list[tuple[int, int, int]]] = {}  # host buffer -> (begin, end, where it is staged)
    end = 0
    for ptr, extents in ranges.items():
        merged: list[list[int]] = []
        for begin, stop in sorted(extents):
            if merged and begin <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([begin, stop])
        spans[ptr] = []
        for begin, stop in merged:
            at = round_up(end, 256) + begin % 256
            spans[ptr].append((begin, stop, at))
            end = at + stop - begin
    staging = torch.empty(round_up(end, 256), dtype=torch.uint8, device=device)  # views of any dtype fit
    for ptr, placed in spans.items():
        host = torch.empty(0, dtype=torch.uint8).set_(storages[ptr])
        for begin, stop, at in placed:
            staging[at : at + stop - begin].copy_(host[begin:stop], non_blocking=True)

    def locate(t: torch.Tensor) -> int:
        placed = spans[t.untyped_storage().data_ptr()]
        begin = t.storage_offset() * t.element_size()
        span_begin, _, at = placed[bisect.bisect_right(placed, (begin, float("inf"), 0)) - 1]
        return at + begin - span_begin

    return staging, locate


def extent_bytes(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last (its strides included)."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


def element_offset(t: torch.Tensor, locate: Callable[[torch.Tensor], int]) -> int:
    """Where the tensor `t` starts in the staging buffer, in elements of its dtype."""
    start = locate(t)
    if start % t.element_size():
        raise ValueError("a tensor misaligned for its dtype in its host buffer")
    return start // t.element_size()


def tensors_to_device(tensors: dict, device: torch.device) -> dict:
    """The {key: (A, B)} tensors on `device`: each host buffer they are views of copied once (from pinned
    memory: asynchronously, on the current stream), the tensors re-made as views of its copy."""
    if device.type == "cpu":
        return tensors
    return on_staging(tensors, device)


def on_staging(tensors: dict, device: torch.device) -> dict:
    """`tensors` as views of their `stage` copy on `device`, with their shapes, strides and dtypes."""
    staging, locate = stage(tensors, device)
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = {}
    for key, pair in tensors.items():
        views = []
        for t in pair:
            base = typed.setdefault(t.dtype, staging.view(t.dtype))
            views.append(torch.as_strided(base, t.shape, t.stride(), element_offset(t, locate)))
        out[key] = tuple(views)
    return out
