"""Which adapter version sits in which GPU slot, who uses it, and which slot to evict next."""

from __future__ import annotations

import time
from collections.abc import Callable

AdapterKey = tuple[str, int]  # (name, version)


class SlotTable:
    """Maps adapter versions to `max_slots` preallocated slots with reference counts and LRU eviction.

    A slot is reused only when no running request holds it, so a request always finishes on the
    weights it was admitted with, even if its adapter was replaced or deleted meanwhile.
    """

    def __init__(self, max_slots: int, load_fn: Callable[[int, object], None]):
        self.max_slots = max_slots
        self._load_fn = load_fn
        self.slot_to_key: list[AdapterKey | None] = [None] * max_slots
        self._refcount = [0] * max_slots
        self._last_used = [0.0] * max_slots
        self._pinned: set[AdapterKey] = set()
        self.num_loads = 0
        self.last_load_seconds = 0.0

    def slot_of(self, key: AdapterKey) -> int | None:
        try:
            return self.slot_to_key.index(key)
        except ValueError:
            return None

    def can_acquire(self, key: AdapterKey) -> bool:
        return self.slot_of(key) is not None or self._victim() is not None

    def acquire(self, key: AdapterKey, weights) -> int | None:
        """Slot holding `key` (loading it if needed) with one more user; None if every slot is busy."""
        slot = self.slot_of(key)
        if slot is None:
            slot = self._victim()
            if slot is None:
                return None
            start = time.perf_counter()
            self.slot_to_key[slot] = None  # not valid while the copy runs (or if it fails)
            self._load_fn(slot, weights)
            self.slot_to_key[slot] = key
            self.last_load_seconds = time.perf_counter() - start
            self.num_loads += 1
        self._refcount[slot] += 1
        self._last_used[slot] = time.monotonic()
        return slot

    def release(self, key: AdapterKey) -> None:
        slot = self.slot_of(key)
        if slot is not None and self._refcount[slot] > 0:
            self._refcount[slot] -= 1
            self._last_used[slot] = time.monotonic()

    def pin(self, key: AdapterKey) -> None:
        """Never evict `key` once loaded (for latency-critical adapters)."""
        self._pinned.add(key)

    def unpin(self, key: AdapterKey) -> None:
        self._pinned.discard(key)

    def _victim(self) -> int | None:
        """An empty slot, else the least recently used unreferenced, unpinned one."""
        if None in self.slot_to_key:
            return self.slot_to_key.index(None)
        idle = [
            s for s in range(self.max_slots)
            if self._refcount[s] == 0 and self.slot_to_key[s] not in self._pinned
        ]
        return min(idle, key=lambda s: self._last_used[s]) if idle else None

    def least_used_key(self) -> AdapterKey | None:
        """The resident, unpinned adapter with the fewest running users (the cheapest to drain)."""
        candidates = [
            s for s in range(self.max_slots)
            if self.slot_to_key[s] is not None and self.slot_to_key[s] not in self._pinned
        ]
        if not candidates:
            return None
        return self.slot_to_key[min(candidates, key=lambda s: (self._refcount[s], self._last_used[s]))]

    def users(self, key: AdapterKey) -> int:
        slot = self.slot_of(key)
        return 0 if slot is None else self._refcount[slot]

    @property
    def num_resident(self) -> int:
        return sum(k is not None for k in self.slot_to_key)
