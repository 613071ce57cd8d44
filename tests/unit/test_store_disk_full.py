"""adapters_store on a full disk: a put fails with 507 and leaves nothing; a delete still works.

ENOSPC is simulated by patching the os calls the store makes (no small real filesystem is available
to CI without root): a failing os.write / os.fsync / file creation at every point of a put.
"""

from __future__ import annotations

import errno
import os

import pytest

import adapters_store.store as store_module
from adapters_store import AdapterStore
from adapters_store.errors import AdapterStorageFullError
from tests.unit.store_helpers import make_store, peft_adapter, snapshot


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def seeded(root) -> tuple[AdapterStore, object]:
    store = make_store(root)
    adapter = peft_adapter(seed=0)
    return store, store.put("a", adapter.config_bytes, adapter.safetensors_bytes)


class FullDisk:
    """Makes the store's writes fail with ENOSPC until `free()`: new files, writes and fsyncs."""

    def __init__(self, monkeypatch, fail_at: dict[str, int] | None = None):
        self.is_full = True
        self.fail_at = fail_at  # {"write": 2}: only the 2nd os.write fails; None: every write fails
        self.calls = {"open": 0, "write": 0, "fsync": 0}
        self._real = {name: getattr(os, name) for name in self.calls}
        for name in self.calls:
            monkeypatch.setattr(os, name, self._hook(name))

    def free(self) -> None:
        self.is_full = False

    def _should_fail(self, name: str, args) -> bool:
        if name == "open" and not (len(args) > 1 and args[1] & os.O_CREAT):
            return False
        self.calls[name] += 1
        if not self.is_full:
            return False
        if self.fail_at is None:
            return True
        return self.fail_at.get(name) == self.calls[name]

    def _hook(self, name: str):
        real = self._real[name]

        def hooked(*args, **kwargs):
            if self._should_fail(name, args):
                raise disk_full()
            return real(*args, **kwargs)

        return hooked


def failure_points() -> list[tuple[str, int]]:
    """Every os.write / os.fsync / O_CREAT open a put makes (counted once on a scratch store)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as root, pytest.MonkeyPatch.context() as patch:
        store, _ = seeded(Path(root))
        counter = FullDisk(patch, fail_at={})
        new = peft_adapter(seed=1)
        store.put("a", new.config_bytes, new.safetensors_bytes)
        counts = dict(counter.calls)
    return [(name, index) for name, count in counts.items() for index in range(1, count + 1)]


@pytest.mark.parametrize(("call", "index"), failure_points())
def test_put_on_a_full_disk_is_507_and_leaves_nothing(tmp_path, monkeypatch, call, index):
    store, record = seeded(tmp_path)
    before = snapshot(tmp_path)
    new = peft_adapter(seed=1)
    FullDisk(monkeypatch, fail_at={call: index})
    with pytest.raises(AdapterStorageFullError, match="no space left") as caught:
        store.put("a", new.config_bytes, new.safetensors_bytes)
    monkeypatch.undo()
    assert caught.value.status_code == 507
    assert snapshot(tmp_path) == before, f"os.{call} #{index} failing left files behind"
    assert make_store(tmp_path).list() == [record]
    assert store.put("a", new.config_bytes, new.safetensors_bytes).version == 2


def test_first_put_of_a_name_on_a_full_disk_leaves_no_adapter_dir(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    before = snapshot(tmp_path)
    adapter = peft_adapter(seed=0)
    FullDisk(monkeypatch, fail_at={"fsync": 4})  # config, weights, staging dir, then the root: after mkdir
    with pytest.raises(AdapterStorageFullError):
        store.put("fresh", adapter.config_bytes, adapter.safetensors_bytes)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert store.list() == []


def test_delete_works_on_a_full_disk(tmp_path, monkeypatch):
    """Nothing can be written until the deleted files are gone; the delete must still succeed."""
    store, _ = seeded(tmp_path)
    adapter = peft_adapter(seed=1)
    store.put("a", adapter.config_bytes, adapter.safetensors_bytes)
    disk = FullDisk(monkeypatch)
    real_rmtree = store_module.shutil.rmtree

    def rmtree_frees_space(*args, **kwargs):
        real_rmtree(*args, **kwargs)
        disk.free()

    monkeypatch.setattr(store_module.shutil, "rmtree", rmtree_frees_space)
    store.delete("a")
    monkeypatch.undo()
    assert store.list() == []
    assert not (tmp_path / "a").exists()
    assert os.listdir(tmp_path / ".trash") == []
    assert (tmp_path / ".versions" / "a").read_text() == "2"
    assert store.put("a", adapter.config_bytes, adapter.safetensors_bytes).version == 3


def test_delete_on_a_disk_that_stays_full_still_never_repeats_a_version(tmp_path, monkeypatch):
    """The tombstone cannot be written at all: the emptied trash entry remembers the version."""
    store, _ = seeded(tmp_path)
    adapter = peft_adapter(seed=1)
    FullDisk(monkeypatch)
    store.delete("a")
    monkeypatch.undo()
    assert store.list() == [] and not (tmp_path / "a").exists()
    (entry,) = os.listdir(tmp_path / ".trash")
    assert os.listdir(tmp_path / ".trash" / entry) == []  # the files are gone, the space is free
    assert store.put("a", adapter.config_bytes, adapter.safetensors_bytes).version == 2
    store.delete("a")
    reopened = make_store(tmp_path)  # the start buries what the full disk left
    assert os.listdir(tmp_path / ".trash") == []
    assert reopened.put("a", adapter.config_bytes, adapter.safetensors_bytes).version == 3


def test_crash_between_trash_rename_and_tombstone_is_finished_at_start(tmp_path, monkeypatch):
    store, _ = seeded(tmp_path)
    monkeypatch.setattr(AdapterStore, "_bury", lambda *args: None)  # crash right after the rename
    store.delete("a")
    monkeypatch.undo()
    assert store.list() == []
    reopened = make_store(tmp_path)
    assert os.listdir(tmp_path / ".trash") == []
    adapter = peft_adapter(seed=0)
    assert reopened.put("a", adapter.config_bytes, adapter.safetensors_bytes).version == 2


def test_an_invalid_adapter_on_a_full_disk_is_its_validation_error_not_507(tmp_path, monkeypatch):
    """The write runs beside the validation: whichever fails first, a bad upload is the client's 422."""
    import torch
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from adapters_store.errors import AdapterValidationError

    store, _ = seeded(tmp_path)
    adapter = peft_adapter(seed=1)
    tensors = load_safetensors(adapter.safetensors_bytes)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    before = snapshot(tmp_path)
    FullDisk(monkeypatch)
    with pytest.raises(AdapterValidationError, match="NaN or Inf"):
        store.put("a", adapter.config_bytes, save_safetensors(tensors))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_a_store_that_need_not_be_durable_puts_without_a_single_fsync(tmp_path, monkeypatch):
    """`AdapterStore(durable=False)` (a benchmark seeding 42 GB of adapters) writes the same version, read
    back the same, with no fsync; the default store fsyncs."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    adapter = peft_adapter(seed=2)
    fast = make_store(tmp_path / "fast")
    fast.durable = False
    record = fast.put("a", adapter.config_bytes, adapter.safetensors_bytes)
    assert calls == [] and fast.get("a") == record
    assert fast.load_weights(record).rank == record.rank
    make_store(tmp_path / "durable").put("a", adapter.config_bytes, adapter.safetensors_bytes)
    assert len(calls) >= 5
