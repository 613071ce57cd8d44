"""The GPU adapter rank pool: aligned power-of-two blocks, best-fit placement, least-recently-used eviction
that never touches a block in use; and the slot table on top of it under random mixed-rank traffic."""

from __future__ import annotations

import random

import pytest

from server.engine.rank_pool import MIN_BLOCK, RankPool, block_size
from server.engine.slot_table import SlotTable


def never(offset: int) -> bool:
    return False


def test_block_sizes_are_powers_of_two_from_the_minimum():
    assert [block_size(r) for r in (1, 8, 9, 16, 17, 30, 64, 65)] == [8, 8, 16, 16, 32, 32, 64, 128]


def test_best_fit_keeps_a_large_block_whole():
    pool = RankPool(40)
    # [32, 40) is the pool's odd 8-unit tail: the exact fit; then 0 in the free [0, 32); then its buddy 8,
    # which leaves [16, 32) whole
    for expected in (32, 0, 8):
        offset, victims = pool.place(8, never, float)
        assert (offset, victims) == (expected, [])
        pool.allocate(offset, 8)
    assert pool.place(16, never, float) == (16, [])
    pool.allocate(16, 16)
    assert pool.place(8, never, float) is None  # full, and nothing may be evicted


def test_eviction_takes_the_least_recently_used_block_that_may_go():
    pool = RankPool(32)
    last_used = {0: 5.0, 8: 1.0, 16: 3.0, 24: 2.0}
    for offset in last_used:
        pool.allocate(offset, 8)
    in_use = {8}
    offset, victims = pool.place(8, lambda o: o not in in_use, last_used.__getitem__)
    assert (offset, victims) == (24, [24])  # 8 is older but in use
    # a 16-block needs both halves evictable: [16, 32) holds 16 (3.0) and 24 (2.0); [0, 16) holds 8 (in use)
    offset, victims = pool.place(16, lambda o: o not in in_use, last_used.__getitem__)
    assert (offset, victims) == (16, [16, 24])
    assert pool.place(32, lambda o: o not in in_use, last_used.__getitem__) is None


def test_allocate_refuses_overlap_and_misalignment():
    pool = RankPool(64)
    pool.allocate(0, 32)
    for offset, size in ((16, 16), (8, 16), (56, 16), (32, 64)):
        with pytest.raises(ValueError):
            pool.allocate(offset, size)
    pool.free(0)
    pool.allocate(16, 16)
    assert pool.used == 16


def test_slot_table_never_evicts_a_version_in_use_under_random_mixed_rank_traffic():
    rng = random.Random(7)
    ranks = {f"a{i}": rng.choice([4, 8, 16, 32, 64]) for i in range(40)}
    loads = []
    table = SlotTable(256, lambda slot, offset, w: loads.append((slot, offset, w)), rank_of=ranks.__getitem__)
    held: list[str] = []
    for _ in range(3000):
        if held and rng.random() < 0.45:
            name = held.pop(rng.randrange(len(held)))
            table.release((name, 1))
            continue
        name = rng.choice(list(ranks))
        slot = table.acquire((name, 1), name)
        if slot is not None:
            held.append(name)
        # invariants: every held version resident at a block of its size, blocks disjoint, within the pool
        for h in set(held):
            s = table.slot_of((h, 1))
            assert s is not None and table.users((h, 1)) == held.count(h)
            assert table.block_units(s) == block_size(ranks[h])
        blocks = sorted((table.slot_offset[s], table.block_units(s)) for s in range(table.num_slots)
                        if table.slot_offset[s] is not None)
        assert all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(blocks, blocks[1:], strict=False))
        assert table.pool.used == sum(n for _, n in blocks) <= 256
    assert len(loads) > 40  # the pool (256 units, mean block ~26) was under pressure: adapters came and went


def test_slot_table_hands_a_whole_aligned_block_to_a_large_adapter():
    table = SlotTable(64, lambda slot, offset, w: None, rank_of=lambda w: w)
    for name in "abcdefgh":
        assert table.acquire((name, 1), MIN_BLOCK) is not None
    for name in "abcdefg":  # h stays in use
        table.release((name, 1))
    slot = table.acquire(("big", 1), 32)
    assert slot is not None and table.slot_offset[slot] == 0  # a..d were the oldest idle block
    assert [table.slot_of((n, 1)) is None for n in "abcdefgh"] == [True] * 4 + [False] * 4
    assert table.acquire(("huge", 1), 64) is None  # h is in use


def test_when_every_slot_id_is_taken_the_oldest_idle_adapter_gives_its_id_up(monkeypatch):
    monkeypatch.setattr("server.engine.slot_table.MAX_SLOT_IDS", 3)
    table = SlotTable(1024, lambda slot, offset, w: None)
    assert table.num_slots == 3
    for name in "abc":
        table.acquire((name, 1), "w")
    table.release(("b", 1))
    table.release(("a", 1))
    assert table.acquire(("d", 1), "w") is not None  # b was released first: the least recently used
    assert [table.slot_of((n, 1)) is None for n in "abcd"] == [False, True, False, False]
    assert table.acquire(("e", 1), "w") is not None and table.slot_of(("a", 1)) is None
    assert table.acquire(("f", 1), "w") is None  # c, d, e are in use


def test_an_adapter_evicted_for_its_slot_id_comes_back_when_there_is_no_room_anyway(monkeypatch):
    monkeypatch.setattr("server.engine.slot_table.MAX_SLOT_IDS", 2)
    evicted = []
    table = SlotTable(64, lambda slot, offset, w: None, rank_of=lambda w: w, on_evicted=evicted.append)
    assert table.acquire(("small", 1), 8) is not None
    assert table.acquire(("big", 1), 32) is not None  # both ids taken; big stays in use
    table.release(("small", 1))
    before = table.slot_of(("small", 1))
    assert table.acquire(("huge", 1), 64) is None  # needs the whole pool: big is in use
    assert table.slot_of(("small", 1)) == before and evicted == []  # small kept its id and block
    assert table.acquire(("other", 1), 8) is not None and evicted == [("small", 1)]
