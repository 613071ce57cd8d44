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

from adapters_store import AdapterRecord, AdapterStore, AdapterWeights
from server.engine.request import AdapterRef


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

    def resolve(self, name: str) -> AdapterRef:
        """Latest version of `name` with its weights in memory; raises AdapterNotFoundError. Blocking:
        call it through a worker thread from async code."""
        record = self.store.get(name)
        return AdapterRef(name=record.name, version=record.version, weights=self.weights(record))

    def weights(self, record: AdapterRecord) -> AdapterWeights:
        key = (record.name, record.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        start = time.perf_counter()
        weights = self.store.load_weights(record)
        if self.pin_memory:
            weights.tensors = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.tensors.items()}
        with self._lock:
            self._cache[key] = weights
            while len(self._cache) > self.max_cpu_adapters:
                self._cache.popitem(last=False)  # running requests keep their own reference
            resident = len(self._cache)
        if self._on_load is not None:
            self._on_load(time.perf_counter() - start, resident)
        return weights

    def forget(self, name: str) -> None:
        """Drop every cached version of `name` (after delete); running requests keep theirs."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]

    @property
    def num_cached(self) -> int:
        return len(self._cache)


def pin_memory_available() -> bool:
    return torch.cuda.is_available()
