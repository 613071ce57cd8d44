"""The CPU adapter tier sized in bytes: LRU eviction under pressure, versions in use never freed nor
counted as free, re-adoption of evicted-but-in-use weights without a disk read."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

import pytest
import torch

from adapters_store import AdapterNotFoundError, AdapterWeights
from server.config import Settings
from server.registry import AdapterRegistry

KIB = 1024


@dataclass(frozen=True)
class FakeRecord:
    name: str
    version: int


class FakeStore:
    """Adapters of a given size in bytes (float32 A of [size/4/64, 64] and an empty B); counts disk reads."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.versions = dict.fromkeys(sizes, 1)
        self.num_reads: dict[tuple[str, int], int] = {}

    def get(self, name: str, version: int | None = None) -> FakeRecord:
        if name not in self.sizes:
            raise AdapterNotFoundError(name)
        return FakeRecord(name, version or self.versions[name])

    def load_weights(self, record: FakeRecord, allocate=None, page_bytes: int = 0, timings=None) -> AdapterWeights:
        """`allocate`: the tensors are views of what it hands out (as `AdapterStore.load_weights` reads)."""
        key = (record.name, record.version)
        self.num_reads[key] = self.num_reads.get(key, 0) + 1
        rows = self.sizes[record.name] // (4 * 64)
        a = torch.zeros(rows, 64)
        if allocate is not None:
            a = allocate(a.numel() * 4)[: a.numel() * 4].view(torch.float32).view(rows, 64).zero_()
        return AdapterWeights(rank=rows, alpha=1.0, use_rslora=False, scaling=1.0,
                              tensors={(0, "q_proj"): (a, torch.zeros(0, rows))})


def _registry(sizes: dict[str, int], max_bytes: int, **kwargs) -> tuple[AdapterRegistry, FakeStore]:
    store = FakeStore(sizes)
    return AdapterRegistry(store, max_bytes=max_bytes, **kwargs), store


def test_byte_budget_evicts_least_recently_used():
    registry, store = _registry({"a": 64 * KIB, "b": 64 * KIB, "c": 64 * KIB}, max_bytes=128 * KIB)
    registry.resolve("a")
    registry.resolve("b")
    registry.resolve("a")  # a is now the most recent
    registry.resolve("c")  # over budget: b goes
    gc.collect()
    assert registry.nbytes == 128 * KIB and registry.num_cached == 2
    registry.resolve("a")
    assert store.num_reads[("a", 1)] == 1  # still cached
    registry.resolve("b")
    assert store.num_reads[("b", 1)] == 2  # was evicted


def test_count_cap_still_applies():
    registry, _ = _registry(dict.fromkeys("abc", 4 * KIB), max_bytes=1 << 30, max_cpu_adapters=2)
    for name in "abc":
        registry.resolve(name)
    assert registry.num_cached == 2


def test_in_use_version_is_kept_and_counted_until_its_request_ends():
    registry, store = _registry({"a": 64 * KIB, "b": 64 * KIB, "c": 64 * KIB}, max_bytes=128 * KIB)
    running = registry.resolve("a")  # a request holds this AdapterRef while it runs
    registry.resolve("b")
    registry.resolve("c")  # over budget: b (unused) goes before a (in use), though a is older
    assert registry.num_cached == 2 and registry.nbytes == 128 * KIB
    assert registry.resolve("a").weights is running.weights  # a stayed cached
    registry.resolve("b")
    assert store.num_reads == {("a", 1): 1, ("b", 1): 2, ("c", 1): 1}  # only b was read twice


def test_evicted_in_use_weights_are_not_counted_as_free():
    registry, _ = _registry({"a": 64 * KIB, "b": 64 * KIB, "c": 64 * KIB}, max_bytes=128 * KIB)
    running_a = registry.resolve("a")
    running_b = registry.resolve("b")
    registry.resolve("c")  # everything else in use: a is evicted from the cache but stays in memory
    assert registry.num_cached < 3
    assert registry.nbytes == 192 * KIB  # the memory really held: a (in use), b (in use), c
    del running_a
    gc.collect()
    assert registry.nbytes == 128 * KIB  # a's last user is gone: its bytes are free now
    del running_b


def test_evicted_in_use_version_is_adopted_again_without_a_disk_read():
    registry, store = _registry({"a": 64 * KIB, "b": 64 * KIB}, max_bytes=64 * KIB)
    running = registry.resolve("a")
    registry.resolve("b")  # a is evicted from the cache, but a request still holds it
    again = registry.resolve("a")
    assert again.weights is running.weights  # one copy in memory, not two
    assert store.num_reads[("a", 1)] == 1


def test_evictions_are_reported():
    evicted = []
    registry, _ = _registry(dict.fromkeys("abcd", 64 * KIB), max_bytes=128 * KIB, on_evict=evicted.append)
    for name in "abcd":
        registry.resolve(name)
    assert sum(evicted) == 2


def test_forget_keeps_running_requests_weights_counted():
    registry, _ = _registry({"a": 64 * KIB}, max_bytes=1 << 20)
    running = registry.resolve("a")
    registry.forget("a")
    assert registry.num_cached == 0 and registry.nbytes == 64 * KIB
    del running
    gc.collect()
    assert registry.nbytes == 0


def test_settings_size_the_tier_in_bytes_and_keep_the_count_cap_optional():
    settings = Settings(device="cpu")
    assert settings.cpu_adapter_cache_bytes == 4 * 1024**3 and settings.max_cpu_adapters is None
    assert Settings(device="cpu", max_cpu_adapters=8).max_cpu_adapters == 8
    with pytest.raises(ValueError):
        Settings(device="cpu", cpu_adapter_cache_bytes=-1)


def test_pinned_tier_counts_whole_pages_and_reads_into_them(monkeypatch):
    """With pinning (CUDA) the tier reserves its pages at start-up (server.pinned_pages.PagePool), has each
    adapter read into them and counts the pages it took, not the tensors' bytes: the budget bounds the
    pinned memory itself. A page goes back to the pool once the weights read into it are gone: evicted
    and no longer used by any request; the next read takes it again, and nothing is pinned afresh."""
    from server import pinned_pages

    fresh = []

    def plain(n):  # no GPU here: plain memory stands for pinned memory
        fresh.append(n)
        return torch.empty(n, dtype=torch.uint8)

    monkeypatch.setattr(pinned_pages, "pinned", plain)
    page = pinned_pages.PAGE_BYTES
    registry, _ = _registry({"a": page // 2, "b": page // 2, "c": page // 2}, max_bytes=2 * page, pin_memory=True)
    assert fresh == [2 * page] and registry._pages.num_free == 2  # one slab of two pages at start-up
    a = registry.resolve("a").weights
    assert registry.nbytes == page  # half a page of tensors takes a whole page
    (copy, _), = a.tensors.values()
    assert torch.equal(copy, torch.zeros(page // 2 // (4 * 64), 64)) and registry._pages.num_free == 1
    registry.resolve("b")
    assert registry._pages.num_free == 0
    registry.resolve("c")  # three pages over a two-page budget: b goes (a is in use here); c's page is fresh
    assert fresh == [2 * page, page]
    del a, copy
    gc.collect()
    assert registry.num_cached == 2 and registry.nbytes == 2 * page
    assert registry._pages.num_free == 1  # b's page came back; c's fresh page is not kept
    registry.forget("a")
    gc.collect()
    assert registry._pages.num_free == 2  # a's too, once nothing uses it
    registry.resolve("b")
    assert fresh == [2 * page, page] and registry._pages.num_free == 1  # read into a reserved page again


def test_page_pool_hands_out_distinct_pages_and_takes_back_only_its_own():
    """Pages are disjoint views of the reserved slabs; a page given back is handed out again; a fresh page
    (the pool was dry) is not kept; a failed read gives its pages back at once."""
    from server.pinned_pages import PAGE_BYTES, PageAllocator, PagePool

    def plain(n):
        return torch.zeros(n, dtype=torch.uint8)

    pool = PagePool(plain)
    assert pool.reserve(3 * PAGE_BYTES + 5) == 3 * PAGE_BYTES and pool.num_free == 3
    pages = [pool.take() for _ in range(4)]  # the fourth is fresh
    starts = sorted(p.data_ptr() for p in pages[:3])
    assert all(b - a >= PAGE_BYTES for a, b in zip(starts, starts[1:], strict=False))
    assert all(p.numel() == PAGE_BYTES for p in pages)
    pool.give_back(pages)
    assert pool.num_free == 3
    allocator = PageAllocator(plain, pool=pool)
    taken = [allocator(100), allocator(PAGE_BYTES), allocator(PAGE_BYTES + 1)]  # the last: a block of its own
    assert pool.num_free == 1 and allocator.nbytes == 2 * PAGE_BYTES + 2 * PAGE_BYTES
    assert taken[2].numel() == PAGE_BYTES + 1
    allocator.release()
    allocator.release()  # once only
    assert pool.num_free == 3


def test_page_pool_takes_pages_back_from_a_finalizer_run_inside_its_own_lock():
    """The weights' finalizer gives pages back; the garbage collector may run it on a thread that is
    inside the pool already (an allocation under its lock). The lock is reentrant: no deadlock."""
    from server.pinned_pages import PAGE_BYTES, PagePool

    pool = PagePool(lambda n: torch.zeros(n, dtype=torch.uint8))
    pool.reserve(2 * PAGE_BYTES)
    page = pool.take()

    def inside():
        with pool._lock:  # as if the collector ran the finalizer here
            pool.give_back([page])

    thread = threading.Thread(target=inside, daemon=True)  # a deadlock fails the test instead of hanging it
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and pool.num_free == 2


def test_page_pool_reserves_in_smaller_slabs_when_a_large_one_cannot_be_pinned():
    from server.pinned_pages import PAGE_BYTES, PagePool

    def limited(n):  # a host that cannot lock more than 2 pages at once
        if n > 2 * PAGE_BYTES:
            raise RuntimeError("cannot pin that much at once")
        return torch.zeros(n, dtype=torch.uint8)

    pool = PagePool(limited)
    assert pool.reserve(5 * PAGE_BYTES) == 5 * PAGE_BYTES and pool.num_free == 5


@pytest.mark.parametrize("pin", [False, True])
def test_adopt_puts_an_uploads_own_weights_in_the_tier_as_a_copy(monkeypatch, pin):
    """`adopt` (an upload's validated weights, not read back from disk) keeps a copy of its own (pinned:
    in the tier's pages), counted in the budget like a load; a later resolve reads nothing; a second
    adopt of the same version does nothing; the source can change afterwards without effect."""
    from server import pinned_pages

    monkeypatch.setattr(pinned_pages, "pinned", lambda n: torch.zeros(n, dtype=torch.uint8))
    page = pinned_pages.PAGE_BYTES
    registry, store = _registry({"a": page // 2}, max_bytes=4 * page, pin_memory=pin)
    source = torch.randn(page // 2 // (4 * 64), 64)
    weights = AdapterWeights(rank=source.shape[0], alpha=1.0, use_rslora=False, scaling=1.0,
                             tensors={(0, "q_proj"): (source, torch.zeros(0, source.shape[0]))})
    assert registry.adopt(FakeRecord("a", 1), weights)
    assert not registry.adopt(FakeRecord("a", 1), weights)
    expected = source.clone()
    source.add_(1.0)  # the upload's buffer is gone or reused: the tier's copy is its own
    (kept, _), = registry.resolve("a").weights.tensors.values()
    assert torch.equal(kept, expected) and store.num_reads == {}
    assert registry.nbytes == (page if pin else page // 2)
    if pin:
        assert registry._pages.num_free == 3  # one of the four reserved pages holds the copy
