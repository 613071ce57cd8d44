"""Pinned host memory for the CPU adapter tier, in pages of one size.

An adapter read back from disk must sit in pinned (page-locked) memory before its copy into a GPU slot
can run beside the decoding batch. Pinning each tensor on its own (`Tensor.pin_memory()`) made one
pinned allocation per tensor: 448 for an 8B rank-16 adapter, 56-86 ms on the H200 host when the
allocator had blocks cached and 200 ms in a fresh process (`python -m bench.cold_load`), most of the
60 ms that issue 15 allows a cold adapter. Here the tier's memory is PAGE_BYTES pages: the store reads a
stored file straight into them (`adapters_store.paged_read`, with a `PageAllocator`), 21 pages for that
adapter, all of one size. The tier keeps its pages itself (`PagePool`): pinned at start-up in large
slabs, off the request path, handed out by page and given back when the weights read into them are
gone, so the tier's pinned memory is what it reserved and a load never waits for the driver to lock
pages (the H200 server's reads did, relying on PyTorch's pinned cache: see `PagePool`). A tensor larger than
a page (ranks of several hundred) gets a pinned block of its own. `pin_packed` copies tensors already
in memory into pages the same way (`bench.cold_load` compares it with the per-tensor pinning).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from server.model.loader import load_phase

log = logging.getLogger(__name__)

PAGE_BYTES = 4 << 20
SLAB_BYTES = 1 << 30  # the pool pins its pages in slabs of this size at most
_ALIGN = 256  # byte alignment of each tensor in a page (any element size divides it)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def pinned(num_bytes: int) -> torch.Tensor:
    return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)


class PagePool:
    """The CPU tier's pages, kept by the tier itself: reserved at start-up in slabs of up to SLAB_BYTES
    (one page-locking call each), handed out one page at a time, given back when the weights read into
    them are gone. On the H200 the server's reads spent about 0.65 ms per MB allocating pages, the rate of
    fresh page locking (1.2-1.5 GB/s), although PyTorch's pinned cache had been warmed with as many pages
    at start-up; a read in `bench.cold_load`, which reuses the cache's blocks, took half the time in all.
    With its own pages the tier does not depend on what that cache keeps. When every page is out (evicted
    weights still in use by requests), `take` falls back to a fresh pinned page, which is not kept."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] | None = None):
        self._allocate = allocate or pinned
        self._free: list[torch.Tensor] = []
        self._slabs: set[int] = set()  # storage addresses of the reserved slabs: their pages come back here
        self._lock = threading.RLock()
        self.num_pages = 0  # pages reserved

    def reserve(self, num_bytes: int) -> int:
        """Pin `num_bytes` of pages (whole pages) now; returns the bytes reserved (less if the host cannot
        lock that much: the rest of the loads then pin fresh pages as they go)."""
        wanted = num_bytes // PAGE_BYTES
        with load_phase("pinned adapter pages", f"{wanted * PAGE_BYTES >> 20} MiB for the CPU adapter tier"):
            slab_pages = SLAB_BYTES // PAGE_BYTES
            while self.num_pages < wanted:
                count = min(slab_pages, wanted - self.num_pages)
                try:
                    slab = self._allocate(count * PAGE_BYTES)
                except RuntimeError as exc:
                    if count > 1:  # smaller slabs, down to one page, before giving up
                        slab_pages = count // 2
                        continue
                    log.warning("pinned adapter pages: reserved %d of %d MiB (%s)", self.num_pages * PAGE_BYTES >> 20,
                                wanted * PAGE_BYTES >> 20, exc)
                    break
                with self._lock:
                    self._slabs.add(slab.untyped_storage().data_ptr())
                    self._free.extend(slab.view(count, PAGE_BYTES).unbind(0))
                    self.num_pages += count
        return self.num_pages * PAGE_BYTES

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._allocate(PAGE_BYTES)

    def give_back(self, pages: list[torch.Tensor]) -> None:
        """Pages whose weights are gone: the reserved ones are handed out again, fresh ones dropped. Called
        from a weakref finalizer, which the garbage collector may run at any allocation, on any thread,
        even inside this pool's own methods: the pages are sorted before the lock is taken, and the lock
        is reentrant."""
        ours = [p for p in pages if p.untyped_storage().data_ptr() in self._slabs]
        with self._lock:
            self._free.extend(ours)

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)


class PageAllocator:
    """`allocate(n)` for `AdapterStore.load_weights`: a page when n fits one (from `pool` when given), else
    a block of n bytes, pinned; `nbytes` counts what was taken (a large block as the allocator's power of
    two). `release()` gives the pool's pages back: call it once no tensor read into them is in use."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] | None = None, pool: PagePool | None = None):
        self._allocate = allocate or pinned
        self._pool = pool
        self._taken: list[torch.Tensor] = []
        self.nbytes = 0

    def __call__(self, num_bytes: int) -> torch.Tensor:
        if num_bytes <= PAGE_BYTES:
            self.nbytes += PAGE_BYTES
            if self._pool is None:
                return self._allocate(PAGE_BYTES)
            page = self._pool.take()
            self._taken.append(page)
            return page
        self.nbytes += 1 << (num_bytes - 1).bit_length()
        return self._allocate(num_bytes)

    def release(self) -> None:
        if self._pool is not None:
            self._pool.give_back(self._taken)
        self._taken = []


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
    """Allocate and free `num_bytes` of pages, so that PyTorch's pinned allocator holds them for the
    allocations to come (its cache keeps freed blocks); returns the bytes warmed. The tier did this before
    it kept its own pages (`PagePool`); `bench.cold_load` still does, to measure what that cache gives. Synchronous, and
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
