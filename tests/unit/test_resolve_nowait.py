"""The event loop's way to an adapter (`AdapterRegistry.resolve_nowait`, `AdapterStore.latest_if_unchanged`): an
answer only when memory holds it and one stat of the adapter's directory shows nothing changed since the last read;
None sends the caller to `resolve` on a worker thread. It must never hand out a version `get` would not."""

from __future__ import annotations

import os
import time

from server.registry import AdapterRegistry
from tests.unit.store_helpers import make_store, peft_adapter

TWO = ("q_proj", "v_proj")


def _settle(store, name: str) -> None:
    """Date the adapter's directory back past the store's settling time, as a minute without uploads would."""
    past = time.time() - 60
    os.utime(store.root / name, (past, past))


def _put(store, name: str, seed: int = 0):
    adapter = peft_adapter(r=4, targets=TWO, seed=seed)
    return store.put(name, adapter.config_bytes, adapter.safetensors_bytes)


def _settled_store(tmp_path):
    """A store holding adapter "a" (version 1), its directory settled; and that version's record."""
    store = make_store(tmp_path)
    record = _put(store, "a")
    _settle(store, "a")
    return store, record


def test_nothing_remembered_before_a_read_or_from_a_directory_just_changed(tmp_path):
    store = make_store(tmp_path)
    _put(store, "a")
    assert store.latest_if_unchanged("a") is None  # never read
    store.get("a")
    assert store.latest_if_unchanged("a") is None  # read while its timestamp could still repeat
    _settle(store, "a")
    assert store.latest_if_unchanged("a") is None  # the settled state was never read
    record = store.get("a")
    assert store.latest_if_unchanged("a") == record
    assert store.latest_if_unchanged("nope") is None


def test_a_new_version_or_a_delete_ends_the_remembered_answer(tmp_path):
    store, _ = _settled_store(tmp_path)
    first = store.get("a")
    assert store.latest_if_unchanged("a") == first
    second = _put(store, "a", seed=1)
    assert second.version == first.version + 1
    assert store.latest_if_unchanged("a") is None
    _settle(store, "a")
    assert store.get("a") == second
    assert store.latest_if_unchanged("a") == second
    store.delete("a")
    assert store.latest_if_unchanged("a") is None


def test_a_timestamp_set_back_by_hand_still_ends_the_remembered_answer(tmp_path):
    """touch -d or rsync -t can give the directory its old mtime again; its ctime still changes."""
    store, _ = _settled_store(tmp_path)
    store.get("a")
    assert store.latest_if_unchanged("a") is not None
    st = os.stat(store.root / "a")
    time.sleep(0.05)  # past the file system's ctime granularity
    os.utime(store.root / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(store.root / "a").st_mtime_ns == st.st_mtime_ns
    assert store.latest_if_unchanged("a") is None


def test_a_newest_version_without_its_manifest_is_not_remembered_past(tmp_path):
    """A put renames the version in, then writes its manifest inside it (the adapter's directory does not change
    then): what get reads in between must not be remembered, or the new version would never be seen."""
    store = make_store(tmp_path)
    first = _put(store, "a")
    (store.root / "a" / f"v{first.version + 1}").mkdir()  # renamed in, manifest not yet written
    _settle(store, "a")
    assert store.get("a") == first
    assert store.latest_if_unchanged("a") is None


def test_registry_answers_without_the_disk_only_for_weights_in_memory(tmp_path):
    store, _ = _settled_store(tmp_path)
    registry = AdapterRegistry(store, max_cpu_adapters=4)
    assert registry.resolve_nowait("a") is None  # store never read
    store.get("a")
    assert registry.resolve_nowait("a") is None  # weights not loaded
    ref = registry.resolve("a")
    fast = registry.resolve_nowait("a")
    assert (fast.name, fast.version) == (ref.name, ref.version) and fast.weights is ref.weights
    registry.forget("a")  # evicted from the tier: the disk again
    assert registry.resolve_nowait("a") is None


def test_registry_without_weights_answers_from_the_store_alone(tmp_path):
    store, record = _settled_store(tmp_path)
    registry = AdapterRegistry(store, load_weights=False)
    store.get("a")
    ref = registry.resolve_nowait("a")
    assert (ref.name, ref.version, ref.weights) == ("a", record.version, None)
