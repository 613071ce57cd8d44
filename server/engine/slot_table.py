"""Which adapter version sits in which GPU slot and where in the rank pool, who uses it, what to evict."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.engine.rank_pool import MIN_BLOCK, RankPool, block_size

AdapterKey = tuple[str, int]  # (name, version)
SLOT_LOADING = -2  # acquire(): the adapter's copy into its slot is still in flight; ask again next step
MAX_SLOT_IDS = 4096  # adapters resident at once, whatever their ranks (sizes the device SlotLayout tables)


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
    """Maps adapter versions to slots, and slots to blocks of a `capacity`-unit rank pool, with reference
    counts and least-recently-used eviction (`rank_pool.RankPool` places the blocks).

    An adapter of rank r takes `block_size(r)` units (`rank_of(weights)` gives r). A slot's block is
    reused only when no running request holds the slot, so a request always finishes on the weights it
    was admitted with, even if its adapter was replaced or deleted meanwhile. A slot id is only a handle:
    there are enough of them for a pool full of the smallest blocks, up to MAX_SLOT_IDS; past that, a
    load first evicts the least recently used idle adapter to free an id.

    `load_fn(slot, offset, weights)` copies an adapter into the pool at `offset` and points `slot` there.
    It may return a `CopyDone` (CUDA: the copy runs on a side stream); the slot then counts as loading,
    never as a victim, and `acquire` answers SLOT_LOADING until the copy is done, so the request waits
    while the running batch carries on. `load_fn` returning None means the copy is complete (CPU):
    acquire then behaves synchronously. `on_loaded(seconds)` is called when a load completes, with the
    time from issue to observed completion; `on_evicted(key)` when an adapter leaves the pool.
    """

    def __init__(self, capacity: int, load_fn: Callable[[int, int, object], CopyDone | None],
                 on_loaded: Callable[[float], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 on_evicted: Callable[[AdapterKey], None] | None = None,
                 rank_of: Callable[[object], int] = lambda weights: MIN_BLOCK):
        self.pool = RankPool(capacity)
        self.num_slots = min(MAX_SLOT_IDS, capacity // MIN_BLOCK)  # slot ids (handles), not a limit on ranks
        self._load_fn = load_fn
        self._on_loaded = on_loaded
        self._on_evicted = on_evicted
        self._rank_of = rank_of
        self._clock = clock
        self.slot_to_key: list[AdapterKey | None] = [None] * self.num_slots
        self.slot_offset: list[int | None] = [None] * self.num_slots  # None: the slot id is free
        self._slot_of: dict[AdapterKey, int] = {}  # resident (or loading) adapters
        self._slot_at: dict[int, int] = {}  # block offset -> slot
        self._free_ids = list(reversed(range(self.num_slots)))  # slot ids without a block; lowest last
        self._refcount = [0] * self.num_slots
        self._last_used = [0.0] * self.num_slots
        self._loading: dict[int, _Load] = {}  # slot -> copy in flight
        self._pinned: set[AdapterKey] = set()
        self._uses = 0  # logical clock of acquires, releases and loads: LRU order without timer ties
        self.num_loads = 0
        self.last_load_seconds = 0.0

    def slot_of(self, key: AdapterKey) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: AdapterKey, weights, wait: bool = False) -> int | None:
        """Slot holding `key` with one more user, loading it if needed; SLOT_LOADING while its copy is in
        flight (no user taken); None if no block can be had now. `wait`: block until the copy is done
        instead (for rows already running that must read the slot at the next step)."""
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
        self._last_used[slot] = self._tick()
        return slot

    def prefetch(self, key: AdapterKey, weights) -> bool:
        """Start loading `key` into free or idle room ahead of its request's admission (no user taken);
        False if it is already resident or loading, or there is no room."""
        return self.slot_of(key) is None and self._start_load(key, weights) is not None

    def is_loading(self, key: AdapterKey) -> bool:
        slot = self.slot_of(key)
        return slot is not None and not self._is_ready(slot)

    def blocking_keys(self, weights) -> list[AdapterKey]:
        """When `acquire` found no room for `weights`: the adapters of the block that is cheapest to empty
        (fewest running users, then least recently used; none pinned or loading). Refusing them new
        work until they have no users frees a block for it. Empty if no block can ever be freed."""
        size = block_size(self._rank_of(weights))
        best, best_score = [], None
        for occupants in self.pool.occupied_candidates(size):
            slots = [self._slot_at[o] for o in occupants]
            if any(self.slot_to_key[s] in self._pinned or not self._is_ready(s) for s in slots):
                continue
            score = (sum(self._refcount[s] for s in slots), max(self._last_used[s] for s in slots))
            if best_score is None or score < best_score:
                best, best_score = [self.slot_to_key[s] for s in slots], score
        return best

    def _start_load(self, key: AdapterKey, weights) -> int | None:
        size = block_size(self._rank_of(weights))
        freed_for_id = None  # (key, offset, size, last use) of an adapter evicted only for its slot id
        if not self._free_ids:  # every id taken (a huge pool of small adapters): free the oldest
            idle = [s for s in self._slot_at.values() if self._is_evictable(s)]
            if not idle:
                return None
            oldest = min(idle, key=lambda s: self._last_used[s])
            freed_for_id = (self.slot_to_key[oldest], self.slot_offset[oldest], self.block_units(oldest),
                            self._last_used[oldest])
            self._evict(oldest, notify=False)
        placement = self.pool.place(size, lambda o: self._is_evictable(self._slot_at[o]),
                                    lambda o: self._last_used[self._slot_at[o]])
        if placement is None:
            if freed_for_id is not None:  # no room anyway: put it back (its weights were not touched)
                self._restore(*freed_for_id)
            return None
        if freed_for_id is not None and self._on_evicted is not None:
            self._on_evicted(freed_for_id[0])
        offset, victims = placement
        for victim in victims:
            self._evict(self._slot_at[victim])
        slot = self._free_ids.pop()
        start = self._clock()
        self.pool.allocate(offset, size)
        self._slot_at[offset] = slot
        self.slot_offset[slot] = offset
        try:
            done = self._load_fn(slot, offset, weights)
        except BaseException:
            self._evict(slot, notify=False)  # nothing valid was loaded: the block is free again
            raise
        self.slot_to_key[slot] = key
        self._slot_of[key] = slot
        self._refcount[slot] = 0
        self._last_used[slot] = self._tick()
        self.num_loads += 1
        if done is None:
            self._finish_load(self._clock() - start)
        else:
            self._loading[slot] = _Load(done, weights, start)
        return slot

    def _evict(self, slot: int, notify: bool = True) -> None:
        key = self.slot_to_key[slot]
        if key is not None:
            del self._slot_of[key]
            if notify and self._on_evicted is not None:
                self._on_evicted(key)
        offset = self.slot_offset[slot]
        self.pool.free(offset)
        del self._slot_at[offset]
        self.slot_to_key[slot] = None
        self.slot_offset[slot] = None
        self._refcount[slot] = 0
        self._free_ids.append(slot)

    def _restore(self, key: AdapterKey, offset: int, size: int, last_used: float) -> None:
        """Undo `_evict(notify=False)` of an idle, loaded adapter whose block nothing has overwritten: it
        gets its id back (the last one freed) and the device layout still points there."""
        slot = self._free_ids.pop()
        self.pool.allocate(offset, size)
        self._slot_at[offset], self.slot_offset[slot] = slot, offset
        self.slot_to_key[slot], self._slot_of[key] = key, slot
        self._last_used[slot] = last_used

    def _tick(self) -> float:
        self._uses += 1
        return float(self._uses)

    def _is_ready(self, slot: int) -> bool:
        """Whether the slot's copy is done (polls it: a finished copy leaves the loading set here)."""
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
            self._last_used[slot] = self._tick()

    def pin(self, key: AdapterKey) -> None:
        """Never evict `key` once loaded (for latency-critical adapters)."""
        self._pinned.add(key)

    def unpin(self, key: AdapterKey) -> None:
        self._pinned.discard(key)

    def _is_evictable(self, slot: int) -> bool:
        """Unused, unpinned and not loading. Polls a copy in flight: one whose request went away (an abort
        after a prefetch) is never asked for again, and must not hold its block for good."""
        return self._refcount[slot] == 0 and self.slot_to_key[slot] not in self._pinned and self._is_ready(slot)

    def block_units(self, slot: int) -> int:
        """Rank units of the pool the slot's block takes (0 for a free slot id)."""
        offset = self.slot_offset[slot]
        return 0 if offset is None else self.pool.size_at(offset)

    def users(self, key: AdapterKey) -> int:
        slot = self.slot_of(key)
        return 0 if slot is None else self._refcount[slot]

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    @property
    def num_loading(self) -> int:
        return len(self._loading)
