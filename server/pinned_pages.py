"""Pinned host memory for the CPU adapter tier, in pages of one size.

An adapter read back from disk must sit in pinned (page-locked) memory before its copy into a GPU slot
can run beside the decoding batch. Pinning each tensor on its own (`Tensor.pin_memory()`) made one
pinned allocation per tensor: 448 for an 8B rank-16 adapter, 56-86 ms on the H200 host when the
allocator had blocks cached and 200 ms in a fresh process (`python -m bench.cold_load`), most of the
60 ms that issue 15 allows a cold adapter. Here the tier's memory is PAGE_BYTES pages: the store reads a
stored file straight into them (`adapters_store.paged_read`, with a `PageAllocator`), 21 pages for that
adapter, all of one size. PyTorch's pinned allocator keeps freed blocks for reuse by size (rounded up
to a power of two), so with one size every page an evicted adapter frees is reused by the next load,
and the tier's pinned memory stays at what it holds, never a mix of size classes that each keep their
own high-water mark. `warm_up` allocates the tier's pages at start-up, off the request path, so that a
fresh process does not pay the driver's page locking on its first cold adapters. A tensor larger than
a page (ranks of several hundred) gets a pinned block of its own. `pin_packed` copies tensors already
in memory into pages the same way (`bench.cold_load` compares it with the per-tensor pinning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from server.model.loader import load_phase

log = logging.getLogger(__name__)

PAGE_BYTES = 4 << 20
_ALIGN = 256  # byte alignment of each tensor in a page (any element size divides it)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def pinned(num_bytes: int) -> torch.Tensor:
    return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)


class PageAllocator:
    """`allocate(n)` for `AdapterStore.load_weights`: a page when n fits one, else a block of n bytes,
    pinned; `nbytes` counts what was taken (a large block as the allocator's power of two)."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] | None = None):
        self._allocate = allocate or pinned
        self.nbytes = 0

    def __call__(self, num_bytes: int) -> torch.Tensor:
        if num_bytes <= PAGE_BYTES:
            self.nbytes += PAGE_BYTES
            return self._allocate(PAGE_BYTES)
        self.nbytes += 1 << (num_bytes - 1).bit_length()
        return self._allocate(num_bytes)


def pin_packed(tensors: dict, allocate: Callable[[int], torch.Tensor] | None = None) -> tuple[dict, int]:
    """Copies of `tensors` ({key: (A, B)}) in pinned pages; returns (the copies, pinned bytes taken).
    Each copy is a view of its page, which stays allocated as long as any view of it lives.
    `allocate(n)`: n bytes of uint8 (default: pinned; tests pass plain memory)."""
    allocate = allocate or pinned
    packed: dict = {}
    page, used, taken = None, PAGE_BYTES, 0
    for key, pair in tensors.items():
        copies = []
        for tensor in pair:
            tensor = tensor.contiguous()
            size = tensor.numel() * tensor.element_size()
            if size > PAGE_BYTES:
                block = allocate(size)
                taken += 1 << (size - 1).bit_length()  # the allocator's power-of-two block
            else:
                if used + size > PAGE_BYTES:
                    page, used = allocate(PAGE_BYTES), 0
                    taken += PAGE_BYTES
                block = page[used : used + size]
                used = _round_up(used + size, _ALIGN)
            copy = block.view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            copies.append(copy)
        packed[key] = tuple(copies)
    return packed, taken


def warm_up(num_bytes: int) -> int:
    """Allocate and free `num_bytes` of pages at start-up, so that PyTorch's pinned allocator holds them
    for the loads to come (its cache keeps freed blocks); returns the bytes warmed. Synchronous, and
    before the engine captures its CUDA graphs: a page-locking call from another thread during a
    capture would break it. About 1.2 GB/s on the H200 host (`bench.cold_load`: 106 ms for a first
    128 MiB block), so the default 4 GiB tier adds about 3 s to start-up."""
    pages = []
    with load_phase("pinned adapter pages", f"{num_bytes >> 20} MiB for the CPU adapter tier"):
        try:
            for _ in range(num_bytes // PAGE_BYTES):
                pages.append(pinned(PAGE_BYTES))
        except RuntimeError as exc:  # the host cannot lock that much: the loads will allocate as they go
            log.warning("pinned adapter pages: warmed %d of %d MiB (%s)", len(pages) * PAGE_BYTES >> 20,
                        num_bytes >> 20, exc)
    return len(pages) * PAGE_BYTES
