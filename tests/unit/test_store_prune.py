"""adapters_store keeps the newest `versions_kept` versions of each adapter and prunes the rest safely."""

from __future__ import annotations

import os

import pytest
import torch

from adapters_store import AdapterNotFoundError, AdapterStore
from server.registry import AdapterRegistry
from tests.unit.store_helpers import MAX_BYTES, MAX_RANK, SPEC, peft_adapter


def kept_store(root, versions_kept: int | None) -> AdapterStore:
    return AdapterStore(root, SPEC, MAX_RANK, MAX_BYTES, versions_kept=versions_kept)


def put_versions(store: AdapterStore, count: int, name: str = "a") -> list:
    return [store.put(name, (a := peft_adapter(seed=i)).config_bytes, a.safetensors_bytes) for i in range(count)]


def test_only_the_newest_versions_stay_on_disk(tmp_path):
    store = kept_store(tmp_path, 2)
    records = put_versions(store, 5)
    put_versions(store, 1, name="b")
    assert sorted(os.listdir(tmp_path / "a")) == ["v4", "v5"]
    assert os.listdir(tmp_path / ".trash") == []
    assert [r.version for r in store.list()] == [5, 1]
    assert store.get("a", 4) == records[3]
    with pytest.raises(AdapterNotFoundError):
        store.get("a", 3)
    with pytest.raises(AdapterNotFoundError):
        store.load_weights(records[0])  # its files are gone: a reader of a pruned record re-resolves


def test_versions_never_repeat_after_pruning_and_delete(tmp_path):
    store = kept_store(tmp_path, 1)
    put_versions(store, 3)
    store.delete("a")
    assert put_versions(store, 1)[0].version == 4


def test_a_lower_setting_prunes_at_start_and_none_keeps_all(tmp_path):
    put_versions(kept_store(tmp_path, None), 4)
    assert len(os.listdir(tmp_path / "a")) == 4
    kept_store(tmp_path, 3)
    assert sorted(os.listdir(tmp_path / "a")) == ["v2", "v3", "v4"]
    with pytest.raises(ValueError, match="versions_kept"):
        kept_store(tmp_path, 0)


def test_weights_a_request_holds_survive_pruning(tmp_path):
    """A request's AdapterRef carries the weights in memory; pruning its version's files changes nothing."""
    store = kept_store(tmp_path, 1)
    registry = AdapterRegistry(store, max_cpu_adapters=4)
    put_versions(store, 1)
    running = registry.resolve("a")
    expected = peft_adapter(seed=0).lora_pair(0, "q_proj")[0]
    put_versions(store, 3)
    assert not (tmp_path / "a" / "v1").exists()
    assert running.version == 1
    assert torch.equal(running.weights.tensors[0, "q_proj"][0], expected)


def test_resolve_retries_when_its_version_is_pruned_before_the_load(tmp_path, monkeypatch):
    """get() returns v1, a concurrent upload prunes v1, then the load runs: resolve must find v2."""
    store = kept_store(tmp_path, 1)
    put_versions(store, 1)
    registry = AdapterRegistry(store, max_cpu_adapters=4)
    real_load = store.load_weights
    newer = peft_adapter(seed=1)

    def upload_lands_first(record):
        if record.version == 1:
            store.put("a", newer.config_bytes, newer.safetensors_bytes)
        return real_load(record)

    monkeypatch.setattr(store, "load_weights", upload_lands_first)
    ref = registry.resolve("a")
    assert ref.version == 2
    assert torch.equal(ref.weights.tensors[0, "q_proj"][0], newer.lora_pair(0, "q_proj")[0])


def test_get_list_and_count_see_the_newest_complete_version_whatever_is_half_written(tmp_path):
    """`get` (on every request's path) and `list` read the newest manifest first and stop there; `count`
    (the disk tier's gauge, refreshed after every upload) only stats. A newer version dir without its
    manifest (a write in progress or interrupted) is not a version; an adapter with no complete version
    is not counted, and a deleted one is gone from all three."""
    store = kept_store(tmp_path, 3)
    records = put_versions(store, 2)
    put_versions(store, 1, name="b")
    (tmp_path / "a" / "v7").mkdir()  # newer than any, no manifest
    (tmp_path / "c" / "v1").mkdir(parents=True)  # an adapter dir with nothing complete in it
    assert store.get("a") == records[-1]
    assert store.get("a", 1) == records[0]
    with pytest.raises(AdapterNotFoundError, match="no version 7"):
        store.get("a", 7)
    with pytest.raises(AdapterNotFoundError, match="not found"):
        store.get("c")
    assert [(r.name, r.version) for r in store.list()] == [("a", 2), ("b", 1)]
    assert store.count() == len(store.list()) == 2
    store.delete("b")
    assert store.count() == len(store.list()) == 1
    with pytest.raises(AdapterNotFoundError, match="not found"):
        store.get("b", 1)


def test_the_engine_process_loads_the_latest_version_when_the_resolved_one_was_pruned(tmp_path):
    """The API process resolved v1; uploads pruned it before the engine process loaded it: the request (not
    started yet) gets the latest version, as resolve does in one process, and a 404 only once the adapter is gone."""
    from server.engine.core import EngineCore

    store = kept_store(tmp_path, 1)
    put_versions(store, 1)
    core = EngineCore(None, store, AdapterRegistry(store, max_cpu_adapters=4), None)
    newer = peft_adapter(seed=1)
    store.put("a", newer.config_bytes, newer.safetensors_bytes)
    ref = core.load_adapter("a", 1)
    assert ref.version == 2
    assert torch.equal(ref.weights.tensors[0, "q_proj"][0], newer.lora_pair(0, "q_proj")[0])
    assert core.load_adapter("a", 2).version == 2
    store.delete("a")
    with pytest.raises(AdapterNotFoundError):
        core.load_adapter("a", 2)
