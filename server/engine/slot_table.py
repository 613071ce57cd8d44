"""Which adapter version sits in which GPU slot, who uses it, and which slot to evict next."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

AdapterKey = tuple[str, int]  # (name, version)
SLOT_LOADING = -2  # acquire(): the adapter's copy into its slot is still in flight; ask again next step


class CopyDone(Protocol):
    """What an asynchronous slot load returns (a torch.cuda.Event): `query()` is True once it is done."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class _Load:
    """A slot copy in flight: its completion event, and the weights it reads (kept alive until done)."""

    done: CopyDone
    weights: Any
    start: float


class SlotTable:
    """Maps adapter versions to `max_slots` preallocated slots with reference counts and LRU eviction.

    A slot is reused only when no running request holds it, so a request always finishes on the
    weights it was admitted with, even if its adapter was replaced or deleted meanwhile.

    `load_fn(slot, weights)` copies an adapter into a slot. It may return a `CopyDone` (CUDA: the copy
    runs on a side stream); the slot then counts as loading, never as a victim, and `acquire` answers
    SLOT_LOADING until the copy is done, so the request waits while the running batch carries on.
    `load_fn` returning None means the copy is complete (CPU): acquire then behaves synchronously.
    `on_loaded(seconds)` is called when a load completes, with the time from issue to observed completion;
    `on_evicted(key)` when a slot's adapter is replaced.
    """

    def __init__(self, max_slots: int, load_fn: Callable[[int, object], CopyDone | None],
                 on_loaded: Callable[[float], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 on_evicted: Callable[[AdapterKey], None] | None = None):
        self.max_slots = max_slots
        self._load_fn = load_fn
        self._on_loaded = on_loaded
        self._on_evicted = on_evicted
        self._clock = clock
        self.slot_to_key: list[AdapterKey | None] = [None] * max_slots
        self._refcount = [0] * max_slots
        self._last_used = [0.0] * max_slots
        self._loading: dict[int, _Load] = {}  # slot -> copy in flight
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

    def acquire(self, key: AdapterKey, weights, wait: bool = False) -> int | None:
        """Slot holding `key` with one more user, loading it if needed; SLOT_LOADING while its copy is in
        flight (no user taken); None if every slot is busy. `wait`: block until the copy is done instead
        (for rows already running that must read the slot at the next step)."""
        slot = self.slot_of(key)
        if slot is None:
            slot = self._start_load(key, weights)
            if slot is None:
                return None
        if wait and slot in self._loading:
            self._loading[slot].done.synchronize()
        if not self._is_ready(slot):
            return SLOT_LOADING
        self._refcount[slot] += 1
        self._last_used[slot] = time.monotonic()
        return slot

    def prefetch(self, key: AdapterKey, weights) -> bool:
        """Start loading `key` into a free or idle slot ahead of its request's admission (no user taken);
        False if it is already resident or loading, or no slot is free."""
        return self.slot_of(key) is None and self._start_load(key, weights) is not None

    def is_loading(self, key: AdapterKey) -> bool:
        slot = self.slot_of(key)
        return slot is not None and slot in self._loading and not self._is_ready(slot)

    def _start_load(self, key: AdapterKey, weights) -> int | None:
        slot = self._victim()
        if slot is None:
            return None
        start = self._clock()
        evicted = self.slot_to_key[slot]
        if evicted is not None and self._on_evicted is not None:
            self._on_evicted(evicted)
        self.slot_to_key[slot] = None  # not valid while the copy runs (or if it fails)
        done = self._load_fn(slot, weights)
        self.slot_to_key[slot] = key
        self._refcount[slot] = 0
        self._last_used[slot] = time.monotonic()
        self.num_loads += 1
        if done is None:
            self._finish_load(self._clock() - start)
        else:
            self._loading[slot] = _Load(done, weights, start)
        return slot

    def _is_ready(self, slot: int) -> bool:
        load = self._loading.get(slot)
        if load is None:
            return True
        if not load.done.query():
            return False
        del self._loading[slot]
        self._finish_load(self._clock() - load.start)
        return True

    def _finish_load(self, seconds: float) -> None:
        self.last_load_seconds = seconds
        if self._on_loaded is not None:
            self._on_loaded(seconds)

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
        """An empty slot, else the least recently used unreferenced, unpinned, not loading one."""
        if None in self.slot_to_key:
            return self.slot_to_key.index(None)
        idle = [s for s in range(self.max_slots) if self._is_evictable(s)]
        return min(idle, key=lambda s: self._last_used[s]) if idle else None

    def _is_evictable(self, slot: int) -> bool:
        return (self._refcount[slot] == 0 and self.slot_to_key[slot] not in self._pinned
                and slot not in self._loading)

    def least_used_key(self) -> AdapterKey | None:
        """The resident, unpinned adapter with the fewest running users (the cheapest to drain)."""
        candidates = [
            s for s in range(self.max_slots)
            if self.slot_to_key[s] is not None and self.slot_to_key[s] not in self._pinned
            and s not in self._loading
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

    @property
    def num_loading(self) -> int:
        return len(self._loading)
