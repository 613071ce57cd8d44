"""Where adapters go in the GPU rank pool: aligned power-of-two blocks, placed by a buddy rule.

The pool (`server.model.lora.LoraSlots`) holds `capacity` rank units; one unit is a row of A per output
slice and a row of B in every LoRA linear, so an adapter of rank r needs r units. Each adapter gets one
block of `block_size(r)` units (the next power of two, at least MIN_BLOCK) at an offset that is a
multiple of that size. Why blocks and not pages: the kernels then read one contiguous A and B per
adapter with no page table, and the usual ranks (8, 16, 32, 64) are powers of two, so nothing is
padded; what alignment costs is fragmentation, which placement keeps low by best fit (the free block
whose largest free enclosing aligned block is smallest, as a buddy allocator splits the smallest free
block that fits), and which eviction clears, since every aligned block is a candidate. Why not one
slot per adapter padded to max_rank: with ranks spread over 8..64 (mean 30) that wastes 53% of the
memory, i.e. the pool would hold half the adapters.

Placement answers "which offset, evicting what": a free block if any, else the block whose evictable
occupants were used least recently (all occupants of a block must be evictable; among equals, the one
evicting fewer units). Occupants of an aligned block are either one larger block containing it or
smaller blocks inside it, because all blocks are aligned powers of two.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

MIN_BLOCK = 8  # rank units: smaller ranks still take 8 (the kernels' tiles are at least 16 wide anyway)


def block_size(rank: int) -> int:
    """Units an adapter of `rank` takes: the next power of two, at least MIN_BLOCK."""
    size = MIN_BLOCK
    while size < rank:
        size *= 2
    return size


class RankPool:
    """Allocated blocks of a `capacity`-unit pool, by offset."""

    def __init__(self, capacity: int):
        if capacity < MIN_BLOCK:
            raise ValueError(f"a rank pool needs at least {MIN_BLOCK} units, got {capacity}")
        self.capacity = capacity
        self._offsets: list[int] = []  # sorted
        self._sizes: dict[int, int] = {}  # offset -> size

    @property
    def used(self) -> int:
        return sum(self._sizes.values())

    def size_at(self, offset: int) -> int:
        return self._sizes[offset]

    def allocate(self, offset: int, size: int) -> None:
        if offset % size or offset + size > self.capacity or self._occupants(offset, size):
            raise ValueError(f"block of {size} at {offset} is not free and aligned in a pool of {self.capacity}")
        bisect.insort(self._offsets, offset)
        self._sizes[offset] = size

    def free(self, offset: int) -> None:
        del self._sizes[offset]
        self._offsets.pop(bisect.bisect_left(self._offsets, offset))

    def place(self, size: int, is_evictable: Callable[[int], bool],
              last_used: Callable[[int], float]) -> tuple[int, list[int]] | None:
        """(offset, offsets of the blocks to evict first) for a new block of `size`; None if every
        candidate holds a block that may not be evicted. `is_evictable` and `last_used` take a block's
        offset. Work is linear in the allocated blocks, not in the capacity."""
        best_free: tuple[int, int] | None = None  # (largest free aligned block around it, offset)
        for start in self._free_candidates(size):
            fit = (self._free_extent(start, size), start)
            if best_free is None or fit < best_free:
                best_free = fit
        if best_free is not None:
            return best_free[1], []
        best_evict: tuple[float, int, int] | None = None  # (newest use among victims, units, offset)
        for start in self._evict_candidates(size):
            occupants = self._occupants(start, size)
            if not all(is_evictable(o) for o in occupants):
                continue
            score = (max(last_used(o) for o in occupants), sum(self._sizes[o] for o in occupants), start)
            if best_evict is None or score < best_evict:
                best_evict = score
        if best_evict is None:
            return None
        start = best_evict[2]
        return start, self._occupants(start, size)

    def _free_candidates(self, size: int) -> list[int]:
        """Free aligned blocks of `size` at either end of each gap between allocated blocks (the ends are
        where the best fit lies: next to used space or the pool's end)."""
        found = []
        edges = [(o, o + self._sizes[o]) for o in self._offsets]
        gaps = zip([0] + [end for _, end in edges], [start for start, _ in edges] + [self.capacity], strict=True)
        for lo, hi in gaps:
            first = -(-lo // size) * size
            last = (hi - size) - (hi - size) % size if hi >= size else -1
            if first + size <= hi:
                found.append(first)
                if last > first:
                    found.append(last)
        return found

    def occupied_candidates(self, size: int) -> list[list[int]]:
        """The occupants (block offsets) of each aligned block of `size` that holds something."""
        return [self._occupants(start, size) for start in sorted(self._evict_candidates(size))]

    def _evict_candidates(self, size: int) -> set[int]:
        """Aligned blocks of `size` that hold something, one per distinct set of occupants: each allocated
        block's own offset if it is at least `size`, else the aligned `size` block around it."""
        candidates = set()
        for o in self._offsets:
            start = o if self._sizes[o] >= size else o - o % size
            if start + size <= self.capacity:
                candidates.add(start)
        return candidates

    def _occupants(self, start: int, size: int) -> list[int]:
        """Offsets of the blocks overlapping [start, start + size)."""
        i = bisect.bisect_right(self._offsets, start) - 1  # the last block starting at or before `start`
        reaches_in = i >= 0 and self._offsets[i] + self._sizes[self._offsets[i]] > start
        first = i if reaches_in else i + 1
        end = bisect.bisect_left(self._offsets, start + size)
        return self._offsets[first:end]

    def _free_extent(self, start: int, size: int) -> int:
        """Size of the largest free aligned block holding the free block [start, start + size): taking the
        candidate with the smallest keeps large aligned blocks whole for large adapters."""
        extent = size
        while extent * 2 <= self.capacity:
            base = start - start % (extent * 2)
            if base + extent * 2 > self.capacity or self._occupants(base, extent * 2):
                break
            extent *= 2
        return extent
