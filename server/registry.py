"""Adapter registry: disk (adapters_store) -> CPU LRU -> the AdapterRef a request is admitted with.

GPU slots are the engine's business (server.engine.slot_table); this tier keeps parsed weights in
CPU memory (pinned when a GPU is present: files read straight into the pages of server.pinned_pages) so
a slot load is a host-to-device copy, not a disk read.
With the engine in its own process, the API process's registry only resolves names to versions
(`load_weights=False`) and the engine process keeps the weights, loading a version by (name, version).

The tier is sized in bytes (`max_bytes`, optionally also in adapters). Eviction drops the cache's
reference only: a request admitted with a version keeps its weights alive through its AdapterRef.
Such evicted-but-in-use weights still occupy memory, so they stay counted against the budget until
their last user is gone, and a new request for that version adopts them again instead of reading the
disk a second time. Unused versions are evicted first (least recently used first); in-use ones only
when the unused ones do not make room.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from adapters_store import AdapterNotFoundError, AdapterRecord, AdapterStore, AdapterWeights, weights_nbytes
from server import pinned_pages
from server.engine.request import AdapterRef
from server.engine.step_trace import StepTrace

_RESOLVE_ATTEMPTS = 3  # a pruned version (store versions_kept) makes resolve look again


class AdapterRegistry:
    """Resolve adapter names to loaded versions; an LRU of at most `max_bytes` of weights (and at most
    `max_cpu_adapters` versions, when set) in memory, counting evicted weights still in use."""

    def __init__(self, store: AdapterStore, max_cpu_adapters: int | None = None, pin_memory: bool = False,
                 on_load: Callable[[float, int], None] | None = None, *, max_bytes: int | None = None,
                 on_evict: Callable[[int], None] | None = None, load_weights: bool = True):
        self.store = store
        self.load_weights = load_weights
        self.max_cpu_adapters = max_cpu_adapters
        self.max_bytes = max_bytes
        self.pin_memory = pin_memory
        self._on_load = on_load
        self._on_evict = on_evict  # called with the number of versions just evicted
        self._cache: OrderedDict[tuple[str, int], AdapterWeights] = OrderedDict()
        self._nbytes: dict[tuple[str, int], int] = {}  # bytes of every cached version
        # Evicted versions a request still holds: alive only as long as some AdapterRef refers to them.
        self._evicted_in_use: weakref.WeakValueDictionary[tuple[str, int], AdapterWeights] = (
            weakref.WeakValueDictionary()
        )
        self._evicted_nbytes: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], _PendingLoad] = {}  # loads in flight, one per version
        self._trace = StepTrace(kind="loads")
        self._pages = pinned_pages.PagePool()
        if pin_memory and load_weights and max_bytes:
            self._pages.reserve(max_bytes)  # the tier's pages pinned at start-up, off every request's path

    def resolve(self, name: str) -> AdapterRef:
        """Latest version of `name` with its weights in memory (None unless `load_weights`); raises
        AdapterNotFoundError. Blocking: call it through a worker thread from async code."""
        for _ in range(_RESOLVE_ATTEMPTS):
            record = self.store.get(name)
            if not self.load_weights:
                return AdapterRef(name=record.name, version=record.version, weights=None)
            try:
                return AdapterRef(name=record.name, version=record.version, weights=self.weights(record))
            except AdapterNotFoundError:
                continue  # that version was pruned between get and load: a newer one is the latest now
        raise AdapterNotFoundError(f"adapter {name!r} kept changing while it was being loaded; retry")

    def resolve_nowait(self, name: str) -> AdapterRef | None:
        """`resolve` without blocking when the answer is in memory: the store's latest version unchanged since it
        was last read (one stat) and its weights in this tier. None otherwise: then call `resolve` on a worker
        thread. Under load the worker's round trip waits for the busy event loop and the GIL (bench.serve c32 with
        --engine-process, H200: HTTP admission 11.9 ms mean in the tenth session, before this path existed; 1.1 and
        2.2 ms in two runs of the twelfth, with it)."""
        record = self.store.latest_if_unchanged(name)
        if record is None:
            return None
        if not self.load_weights:
            return AdapterRef(name=record.name, version=record.version, weights=None)
        with self._lock:
            weights = self._cached((record.name, record.version))
        if weights is None:
            return None
        return AdapterRef(name=record.name, version=record.version, weights=weights)

    def weights(self, record: AdapterRecord) -> AdapterWeights:
        """The in-memory weights of one version, loaded from disk at most once at a time: concurrent
        first uses wait for the one load in flight and share its result."""
        key = (record.name, record.version)
        num_evicted = 0
        with self._lock:
            cached = self._cached(key)
            if cached is not None:
                return cached
            cached = self._evicted_in_use.pop(key, None)
            if cached is not None:  # still in memory for a running request: adopt it again
                num_evicted = self._insert(key, cached, self._evicted_nbytes.pop(key))
            else:
                pending = self._loading.get(key)
                is_loader = pending is None
                if is_loader:
                    pending = self._loading[key] = _PendingLoad()
        if cached is not None:
            self._report_evictions(num_evicted)
            return cached
        if not is_loader:
            return pending.wait()
        return self._fill(key, pending, lambda: self._load(record))

    def _cached(self, key: tuple[str, int]) -> AdapterWeights | None:
        """The tier's weights of version `key`, marked most recently used; None when not in the tier. Hold
        self._lock."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
        return cached

    def adopt(self, record: AdapterRecord, weights: AdapterWeights) -> bool:
        """Put a version just stored in this tier from the weights its upload's validation parsed (the
        very bytes that were hashed and written), copied into the tier's pages: its first request then
        finds it in memory, with no read-back from disk. Concurrent first uses wait for the copy as for
        a load. False when the version is already here or loading (nothing done)."""
        key = (record.name, record.version)
        with self._lock:
            if key in self._cache or key in self._loading:
                return False
            pending = self._loading[key] = _PendingLoad()
        self._fill(key, pending, lambda: self._copy_in(weights))
        return True

    def _fill(self, key: tuple[str, int], pending: _PendingLoad,
              produce: Callable[[], tuple[AdapterWeights, int]]) -> AdapterWeights:
        """Bring in the version `key` whose load this thread owns (`pending`, registered in _loading):
        `produce()` gives its weights and their bytes in this tier; they are cached, the waiters woken
        and the load reported. On failure the waiters get the error."""
        start = time.perf_counter()
        try:
            weights, nbytes = produce()
        except BaseException as err:
            with self._lock:
                del self._loading[key]
            pending.fail(err)
            raise
        with self._lock:
            del self._loading[key]
            num_evicted = self._insert(key, weights, nbytes)
            resident = len(self._cache)
        pending.done(weights)
        if self._on_load is not None:
            self._on_load(time.perf_counter() - start, resident)
        self._report_evictions(num_evicted)
        return weights

    def _copy_in(self, weights: AdapterWeights) -> tuple[AdapterWeights, int]:
        """`weights` copied into memory of this tier's own (pinned: its pages), and the bytes taken."""
        if not self.pin_memory:
            copied = {key: tuple(t.clone() for t in pair) for key, pair in weights.tensors.items()}
            copy = dataclasses.replace(weights, tensors=copied)
            return copy, weights_nbytes(copy)
        return self._in_pages(lambda pages: dataclasses.replace(
            weights, tensors=pinned_pages.pin_packed(weights.tensors, pages)[0]))

    def _in_pages(self, fill: Callable[[pinned_pages.PageAllocator], AdapterWeights]) -> tuple[AdapterWeights, int]:
        """`fill(pages)`: weights whose tensors are views of the pool pages it takes from `pages`; returns
        them and the bytes taken. The pages go back to the pool when the weights are gone: evicted from
        the tier and released by every request and slot copy that used them (a slot copy holds its
        weights until it is done); at once if `fill` raises (it must return or raise only once nothing
        writes into them)."""
        pages = pinned_pages.PageAllocator(pool=self._pages)
        try:
            weights = fill(pages)
        except BaseException:
            pages.release()
            raise
        weakref.finalize(weights, pages.release)
        return weights, pages.nbytes

    def cached(self, name: str, version: int) -> AdapterWeights | None:
        """The weights of one version if they are in memory (never reads the disk)."""
        with self._lock:
            return self._cache.get((name, version))

    def _report_evictions(self, num_evicted: int) -> None:
        if num_evicted and self._on_evict is not None:
            self._on_evict(num_evicted)

    def _insert(self, key: tuple[str, int], weights: AdapterWeights, nbytes: int) -> int:
        """Cache `weights` as the most recent entry and evict until within budget (lock held); returns how
        many versions were evicted. The new entry itself is never evicted: its caller is about to use it."""
        self._cache[key] = weights
        self._nbytes[key] = nbytes
        num_evicted = 0
        for is_in_use_pass in (False, True):
            for old in [k for k in self._cache if k != key]:
                if not self._is_over_budget():
                    return num_evicted
                if self._is_in_use(old) is is_in_use_pass:
                    self._evict(old)
                    num_evicted += 1
        return num_evicted

    def _is_over_budget(self) -> bool:
        over_count = self.max_cpu_adapters is not None and len(self._cache) > self.max_cpu_adapters
        return over_count or (self.max_bytes is not None and self._count_bytes() > self.max_bytes)

    def _is_in_use(self, key: tuple[str, int]) -> bool:
        """Whether anything besides this cache refers to the cached weights (a live request's AdapterRef)."""
        return sys.getrefcount(self._cache[key]) > _CACHED_ONLY_REFS

    def _evict(self, key: tuple[str, int]) -> None:
        weights = self._cache.pop(key)
        nbytes = self._nbytes.pop(key)
        if sys.getrefcount(weights) > _LOCAL_ONLY_REFS:  # in use: it stays in memory, and counted
            self._evicted_in_use[key] = weights
            self._evicted_nbytes[key] = nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of adapter weights this tier holds in memory: cached, plus evicted but still in use."""
        with self._lock:
            return self._count_bytes()

    def _count_bytes(self) -> int:
        self._evicted_nbytes = {k: n for k, n in self._evicted_nbytes.items() if k in self._evicted_in_use}
        return sum(self._nbytes.values()) + sum(self._evicted_nbytes.values())

    def _load(self, record: AdapterRecord) -> tuple[AdapterWeights, int]:
        """The weights of one version and the bytes they take in this tier (pinned: whole pages)."""
        if not self.pin_memory:
            weights = self.store.load_weights(record)
            return weights, weights_nbytes(weights)
        marks: dict[str, float] = {}
        start = time.perf_counter()
        # The file is read straight into the tier's pages (load_weights returns or raises only once no
        # read writes into them).
        weights, nbytes = self._in_pages(
            lambda pages: self.store.load_weights(record, pages, pinned_pages.PAGE_BYTES, timings=marks))
        if self._trace.enabled:  # LORAPLEX_STEP_TRACE: the stages of each read (diagnosis only)
            self._trace.record(adapter=record.name, version=record.version, mb=round(nbytes / 2**20, 1),
                               ms=round((time.perf_counter() - start) * 1e3, 2),
                               **{stage: round(s * 1e3, 2) for stage, s in marks.items()})
            self._trace.flush()
        return weights, nbytes

    def forget(self, name: str) -> None:
        """Drop every cached version of `name` (after delete); running requests keep theirs."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                self._evict(key)

    @property
    def num_cached(self) -> int:
        return len(self._cache)


def _refcount_baselines() -> tuple[int, int]:
    """sys.getrefcount of an object held only by a dict entry, and only by a local name, measured the
    way the registry measures (the counts include the call's own reference and differ by version)."""
    cache = {0: AdapterWeights(rank=1, alpha=1.0, use_rslora=False, scaling=1.0)}
    cached_only = sys.getrefcount(cache[0])
    local = cache.pop(0)
    return cached_only, sys.getrefcount(local)


_CACHED_ONLY_REFS, _LOCAL_ONLY_REFS = _refcount_baselines()


class _PendingLoad:
    """One load in flight; other threads asking for the same version wait for its outcome."""

    def __init__(self):
        self._event = threading.Event()
        self._weights: AdapterWeights | None = None
        self._error: BaseException | None = None

    def done(self, weights: AdapterWeights) -> None:
        self._weights = weights
        self._event.set()

    def fail(self, err: BaseException) -> None:
        self._error = err
        self._event.set()

    def wait(self) -> AdapterWeights:
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._weights


def pin_memory_available() -> bool:
    return torch.cuda.is_available()
