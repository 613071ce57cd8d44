"""Adapter registry: disk (adapters_store) -> CPU LRU -> the AdapterRef a request is admitted with.

GPU slots are the engine's business (server.engine.slot_table); this tier keeps parsed weights in
CPU memory (pinned when a GPU is present) so a slot load is a host-to-device copy, not a disk read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from adapters_store import AdapterNotFoundError, AdapterRecord, AdapterStore, AdapterWeights
from server.engine.request import AdapterRef

_RESOLVE_ATTEMPTS = 3  # a pruned version (store versions_kept) makes resolve look again


class AdapterRegistry:
    """Resolve adapter names to loaded versions; LRU of at most `max_cpu_adapters` in memory."""

    def __init__(self, store: AdapterStore, max_cpu_adapters: int, pin_memory: bool = False,
                 on_load: Callable[[float, int], None] | None = None):
        self.store = store
        self.max_cpu_adapters = max_cpu_adapters
        self.pin_memory = pin_memory
        self._on_load = on_load
        self._cache: OrderedDict[tuple[str, int], AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], _PendingLoad] = {}  # loads in flight, one per version

    def resolve(self, name: str) -> AdapterRef:
        """Latest version of `name` with its weights in memory; raises AdapterNotFoundError. Blocking:
        call it through a worker thread from async code."""
        for _ in range(_RESOLVE_ATTEMPTS):
            record = self.store.get(name)
            try:
                return AdapterRef(name=record.name, version=record.version, weights=self.weights(record))
            except AdapterNotFoundError:
                continue  # that version was pruned between get and load: a newer one is the latest now
        raise AdapterNotFoundError(f"adapter {name!r} kept changing while it was being loaded; retry")

    def weights(self, record: AdapterRecord) -> AdapterWeights:
        """The in-memory weights of one version, loaded from disk at most once at a time: concurrent
        first uses wait for the one load in flight and share its result."""
        key = (record.name, record.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = _PendingLoad()
                is_loader = True
            else:
                is_loader = False
        if not is_loader:
            return pending.wait()
        start = time.perf_counter()
        try:
            weights = self._load(record)
        except BaseException as err:
            with self._lock:
                del self._loading[key]
            pending.fail(err)
            raise
        with self._lock:
            del self._loading[key]
            self._cache[key] = weights
            while len(self._cache) > self.max_cpu_adapters:
                self._cache.popitem(last=False)  # running requests keep their own reference
            resident = len(self._cache)
        pending.done(weights)
        if self._on_load is not None:
            self._on_load(time.perf_counter() - start, resident)
        return weights

    def _load(self, record: AdapterRecord) -> AdapterWeights:
        weights = self.store.load_weights(record)
        if self.pin_memory:
            weights.tensors = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.tensors.items()}
        return weights

    def forget(self, name: str) -> None:
        """Drop every cached version of `name` (after delete); running requests keep theirs."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]

    @property
    def num_cached(self) -> int:
        return len(self._cache)


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
