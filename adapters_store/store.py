"""Durable, versioned adapter storage on a local filesystem.

Layout::

    root/<name>/v<version>/adapter_config.json
    root/<name>/v<version>/adapter_model.safetensors
    root/<name>/v<version>/manifest.json      written last; without it the version does not exist
    root/.staging/<random>/                    uploads being written (swept at start)
    root/.trash/<random>/                      pruned versions being removed (swept at start)
    root/.trash/<random>@<last version>@<name>/ adapters being deleted (swept at start)
    root/.versions/<name>                      last version of a deleted adapter (a tombstone)

A put writes and fsyncs the files in a staging dir, renames it to `v<N>`, then writes manifest.json
(temp file + fsync + rename). A crash at any point leaves the previous versions untouched and at
most an invisible version dir, which the next start removes. A put that fails because the disk is
full raises AdapterStorageFullError (507) and leaves nothing behind. Writes (and the start-up sweep)
are serialized by an exclusive flock on root/.lock, so several processes may share a root (replicas on
one disk); readers take no lock. Versions start at 1 and grow by one; with
`versions_kept=K` a put then moves every version older than the newest K into .trash and removes it
(readers of a pruned version get AdapterNotFoundError and re-resolve). Versions never repeat for a
name, even after a delete, so (name, version) always identifies the same bytes and is a safe cache
key: a delete first renames the adapter into .trash under a name that carries its last version,
empties it (so a delete frees space even on a full disk), then writes the tombstone and removes the
empty dir; until the tombstone exists, the trash entry itself remembers the version.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from . import digests, read_back
from .archive import extract_adapter_files
from .errors import (
    AdapterNotFoundError,
    AdapterStorageFullError,
    AdapterTooLargeError,
    InvalidAdapterNameError,
)
from .fsio import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    StoreWriterLock,
    fsync_dir,
    is_disk_full,
    read_adapter_dir,
    write_file_durable,
)
from .peft_format import parse_adapter
from .records import MANIFEST_FILE, NAME_PATTERN, AdapterRecord, read_manifest, validate_name, write_manifest
from .spec import AdapterWeights, BaseModelSpec

_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,8})$")
_TRASHED_ADAPTER = re.compile(r"^[0-9a-f]{16}@([1-9][0-9]{0,8})@(.+)$")
_SETTLED_NS = 2_000_000_000  # directory timestamps older than this are trusted to change on the next change


def _dir_state(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, mtime, ctime in ns) of a directory, None when it is gone. The ctime catches an mtime set back
    by hand (touch -d, rsync -t): setting it changes the ctime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


class AdapterStore:
    """Versioned adapter directories under one root, written atomically."""

    def __init__(self, root: Path, spec: BaseModelSpec, max_rank: int, max_bytes: int,
                 versions_kept: int | None = None, durable: bool = True):
        """`durable` False: puts skip every fsync (still atomic: a version is whole or absent), for stores
        that need not outlive a crash of the machine, e.g. a benchmark seeding 1,000 adapters (42 GB)."""
        if versions_kept is not None and versions_kept < 1:
            raise ValueError(f"versions_kept must be at least 1 (or None to keep all), got {versions_kept}")
        self.durable = durable
        self.root = Path(root).resolve()
        self.spec, self.max_rank, self.max_bytes = spec, max_rank, max_bytes
        self.versions_kept = versions_kept
        self._staging, self._trash = self.root / ".staging", self.root / ".trash"
        self._tombstones = self.root / ".versions"
        for path in (self.root, self._staging, self._trash, self._tombstones):
            path.mkdir(parents=True, exist_ok=True)
        self._lock = StoreWriterLock(self.root / ".lock")  # across processes sharing this root, too
        self._latest_seen: dict[str, tuple[tuple[int, int, int, int], AdapterRecord]] = {}  # latest_if_unchanged
        with self._lock:
            self._sweep()

    def put(self, name: str, config_bytes: bytes, safetensors_bytes: bytes | memoryview,
            owner: str | None = None) -> AdapterRecord:
        """Validate an adapter and store it as the next version of `name`, uploaded by tenant `owner`
        (`put_with_weights` without the weights)."""
        return self.put_with_weights(name, config_bytes, safetensors_bytes, owner)[0]

    def put_with_weights(self, name: str, config_bytes: bytes, safetensors_bytes: bytes | memoryview,
                         owner: str | None = None) -> tuple[AdapterRecord, AdapterWeights]:
        """Validate an adapter and store it as the next version of `name`, uploaded by tenant `owner`;
        returns its record and the weights the validation parsed (views of `safetensors_bytes`: the bytes
        hashed and written), which a CPU tier can take without reading the file back.

        The validation and the sha256 run on two threads while this one writes the staged files (under
        the store lock, as before): for an 84 MB adapter the NaN scan and the hash no longer wait for a
        disk write of the same size, or it for them. Nothing becomes visible before both pass; a write
        is abandoned as soon as the validation fails, and then the validation's error is raised (a bad
        upload is a 4xx even when the disk is also full)."""
        adapter_dir = self._adapter_dir(name)
        size_bytes = len(config_bytes) + len(safetensors_bytes)
        if size_bytes > self.max_bytes:
            raise AdapterTooLargeError(f"adapter is {size_bytes} bytes, more than the {self.max_bytes}-byte limit")
        digest, chunk_digests = digests.submit_whole(safetensors_bytes), digests.submit_chunks(safetensors_bytes)
        with ThreadPoolExecutor(1, thread_name_prefix="loraplex-put") as pool:
            parsed = pool.submit(parse_adapter, config_bytes, safetensors_bytes, self.spec, self.max_rank)
            with self._lock:
                try:
                    record = self._commit(name, adapter_dir, owner, size_bytes, config_bytes, safetensors_bytes,
                                          parsed, digest, chunk_digests)
                    weights = parsed.result()[1]
                except (OSError, _Abandoned) as exc:
                    parsed.result()  # an invalid adapter: its validation error, whatever the write met
                    if isinstance(exc, OSError) and is_disk_full(exc):
                        raise AdapterStorageFullError(
                            f"no space left on the adapter store's disk ({self.root}) for {size_bytes} bytes: "
                            f"adapter {name!r} was not stored; delete adapters or free space and retry"
                        ) from None
                    raise
                self._prune(adapter_dir)
        return record, weights

    def _commit(self, name: str, adapter_dir: Path, owner: str | None, size_bytes: int, config_bytes: bytes,
                safetensors_bytes: bytes | memoryview, parsed: Future, digest: Future,
                chunk_digests: list[Future]) -> AdapterRecord:
        """Write one version durably once `parsed` (the validation) succeeds (caller holds the lock); on
        any failure remove what it wrote."""
        staging = self._staging / secrets.token_hex(8)
        staging.mkdir()
        version_dir = None

        def invalid() -> bool:
            return parsed.done() and parsed.exception() is not None

        try:
            write_file_durable(staging / CONFIG_FILE, config_bytes, sync=self.durable)
            if not write_file_durable(staging / WEIGHTS_FILE, safetensors_bytes, stop=invalid, sync=self.durable):
                raise _Abandoned
            config, weights = parsed.result()
            self._sync_dir(staging)
            adapter_dir.mkdir(exist_ok=True)
            self._sync_dir(self.root)
            version = max([*self._version_numbers(adapter_dir), self._deleted_version(name)]) + 1
            version_dir = adapter_dir / f"v{version}"
            os.rename(staging, version_dir)
            self._sync_dir(adapter_dir)
            record = AdapterRecord(
                name=name, version=version, sha256=digest.result(), rank=weights.rank, alpha=weights.alpha,
                use_rslora=weights.use_rslora, target_modules=config["target_modules"], size_bytes=size_bytes,
                created=int(time.time()), path=version_dir, owner=owner,
                chunk_sha256=digests.results(chunk_digests),
            )
            write_manifest(record, sync=self.durable)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if version_dir is not None:
                shutil.rmtree(version_dir, ignore_errors=True)
            _remove_if_empty(adapter_dir)
            raise
        return record

    def _sync_dir(self, path: Path) -> None:
        if self.durable:
            fsync_dir(path)

    def _prune(self, adapter_dir: Path) -> None:
        """Remove every complete version older than the newest `versions_kept` (caller holds the lock).

        A request holds its adapter's weights in memory from the moment it resolves them, so removing
        the files of an older version never affects a running request (see README, "Versions")."""
        if self.versions_kept is None:
            return
        for record in self._records(adapter_dir)[: -self.versions_kept]:
            doomed = self._trash / secrets.token_hex(8)
            try:
                os.rename(record.path, doomed)
            except OSError:
                continue  # stays on disk; the next put or start retries
            shutil.rmtree(doomed, ignore_errors=True)

    def put_archive(self, name: str, archive_bytes: bytes, owner: str | None = None) -> AdapterRecord:
        """Store an adapter uploaded as one .tar.gz or .zip archive (see archive.py for layout rules)."""
        self._adapter_dir(name)
        config_bytes, safetensors_bytes = extract_adapter_files(archive_bytes, self.max_bytes)
        return self.put(name, config_bytes, safetensors_bytes, owner)

    def put_dir(self, name: str, src_dir: Path, owner: str | None = None) -> AdapterRecord:
        """Store a copy of a PEFT adapter directory (symlinked files are refused)."""
        self._adapter_dir(name)
        config_bytes, safetensors_bytes = read_adapter_dir(Path(src_dir), self.max_bytes)
        return self.put(name, config_bytes, safetensors_bytes, owner)

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """The latest (or the given) complete version of `name`."""
        adapter_dir = self._adapter_dir(name)
        if version is None:  # on every request's path: one manifest read, not one per version kept
            now = time.time_ns()
            state = _dir_state(adapter_dir)  # before the read: a change during it leaves a different state
            versions = self._version_numbers(adapter_dir)
            record = self._latest(adapter_dir, versions)
            if record is None:
                self._latest_seen.pop(name, None)
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            settled = state is not None and now - state[2] > _SETTLED_NS  # unchanged for a while when stat ran
            if settled and record.version == max(versions):
                self._latest_seen[name] = (state, record)
            return record
        record = read_manifest(adapter_dir.name, version, adapter_dir / f"v{version}") if version > 0 else None
        if record is None:
            if self._latest(adapter_dir) is None:
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            raise AdapterNotFoundError(f"adapter {name!r} has no version {version}")
        return record

    def latest_if_unchanged(self, name: str) -> AdapterRecord | None:
        """What `get(name)` last found, when one stat of the adapter's directory shows that no version has been
        added, pruned or deleted since (a new version is renamed in, so the directory changes); None when only
        reading it can tell. Cheap enough for an event loop, where `get` is not. `get` remembers only what it
        read from a directory unchanged for _SETTLED_NS when it looked (older than the file system's timestamp
        granularity) whose newest version was complete, so a version renamed in before its manifest is written is
        never missed. One entry per adapter name found; a name found missing loses its entry."""
        seen = self._latest_seen.get(name)  # names get() validated
        if seen is None or _dir_state(self.root / name) != seen[0]:
            return None
        return seen[1]

    def list(self) -> list[AdapterRecord]:
        """The latest version of every adapter, sorted by name."""
        latest = []
        for entry in sorted(os.listdir(self.root)):
            if NAME_PATTERN.fullmatch(entry) and (record := self._latest(self.root / entry)) is not None:
                latest.append(record)
        return latest

    def count(self) -> int:
        """How many adapters have a version with a manifest, by `stat` alone (the disk tier's gauge,
        refreshed after every upload: `list` reads a manifest per adapter, 1,000 of them in a large
        store)."""
        return sum(1 for entry in os.listdir(self.root) if NAME_PATTERN.fullmatch(entry) and any(
            (self.root / entry / f"v{version}" / MANIFEST_FILE).is_file()
            for version in self._version_numbers(self.root / entry)))

    def delete(self, name: str) -> None:
        """Remove every version of `name`: one atomic rename into .trash, then removal. Writes nothing
        before the files are gone, so it works on a full disk."""
        adapter_dir = self._adapter_dir(name)
        with self._lock:
            if not self._records(adapter_dir):
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            last_version = max(self._version_numbers(adapter_dir))
            doomed = self._trash / f"{secrets.token_hex(8)}@{last_version}@{name}"
            os.rename(adapter_dir, doomed)
            self._bury(doomed, name, last_version)

    def _bury(self, doomed: Path, name: str, last_version: int) -> None:
        """Empty a deleted adapter's trash dir, record its last version in a tombstone, remove the dir.
        If the tombstone cannot be written the empty dir stays: its name still carries the version."""
        with contextlib.suppress(OSError):  # make the rename durable before the files go
            fsync_dir(self.root)
            fsync_dir(self._trash)
        for entry in os.listdir(doomed):
            shutil.rmtree(doomed / entry, ignore_errors=True)
        try:
            self._write_tombstone(name, max(last_version, self._tombstone_version(name)))
            doomed.rmdir()
        except OSError:
            pass  # the adapter is gone either way; the next start retries (the dir name keeps the version)

    def load_weights(self, record: AdapterRecord, allocate: Callable[[int], torch.Tensor] | None = None,
                     page_bytes: int = 0, timings: dict[str, float] | None = None) -> AdapterWeights:
        """Read a stored version back, after re-checking its sha256 and config (`read_back.load_weights`:
        into `allocate`'s blocks of `page_bytes` when given, the CPU tier's pages)."""
        return read_back.load_weights(record, self.spec, self.max_rank, self.max_bytes, allocate, page_bytes,
                                      timings)

    def _adapter_dir(self, name: str) -> Path:
        path = (self.root / validate_name(name)).resolve()
        if path.parent != self.root:
            raise InvalidAdapterNameError(f"invalid adapter name {name!r}: resolves outside the store")
        return path

    @staticmethod
    def _version_numbers(adapter_dir: Path) -> list[int]:
        try:
            entries = os.listdir(adapter_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [int(m[1]) for entry in entries if (m := _VERSION_DIR.fullmatch(entry))]

    def _latest(self, adapter_dir: Path, versions: list[int] | None = None) -> AdapterRecord | None:
        """The newest complete version of one adapter, reading manifests newest first."""
        if versions is None:
            versions = self._version_numbers(adapter_dir)
        for version in sorted(versions, reverse=True):
            record = read_manifest(adapter_dir.name, version, adapter_dir / f"v{version}")
            if record is not None:
                return record
        return None

    def _records(self, adapter_dir: Path) -> list[AdapterRecord]:
        """Complete versions of one adapter, oldest first."""
        records = []
        for version in sorted(self._version_numbers(adapter_dir)):
            record = read_manifest(adapter_dir.name, version, adapter_dir / f"v{version}")
            if record is not None:
                records.append(record)
        return records

    def _deleted_version(self, name: str) -> int:
        """The last version a deleted `name` had: its tombstone, or a trash dir not yet buried."""
        buried = [int(m[1]) for entry in os.listdir(self._trash)
                  if (m := _TRASHED_ADAPTER.fullmatch(entry)) and m[2] == name]
        return max([self._tombstone_version(name), *buried])

    def _tombstone_version(self, name: str) -> int:
        try:
            return int((self._tombstones / name).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def _write_tombstone(self, name: str, version: int) -> None:
        temp = self._tombstones / f".{name}.{secrets.token_hex(8)}"  # no adapter name starts with "."
        write_file_durable(temp, str(version).encode())
        os.rename(temp, self._tombstones / name)
        fsync_dir(self._tombstones)

    def _sweep(self) -> None:
        """Remove what an interrupted put or delete left behind: staging, trash, manifest-less versions."""
        for entry in os.listdir(self._tombstones):
            if entry.startswith("."):
                os.unlink(self._tombstones / entry)
        for entry in os.listdir(self._staging):
            shutil.rmtree(self._staging / entry, ignore_errors=True)
        for entry in os.listdir(self._trash):
            if m := _TRASHED_ADAPTER.fullmatch(entry):
                self._bury(self._trash / entry, m[2], int(m[1]))
            else:
                shutil.rmtree(self._trash / entry, ignore_errors=True)
        for entry in os.listdir(self.root):
            adapter_dir = self.root / entry
            if not NAME_PATTERN.fullmatch(entry) or not adapter_dir.is_dir():
                continue
            for version in self._version_numbers(adapter_dir):
                version_dir = adapter_dir / f"v{version}"
                if read_manifest(entry, version, version_dir) is None:
                    shutil.rmtree(version_dir, ignore_errors=True)
            _remove_if_empty(adapter_dir)
            self._prune(adapter_dir)


def _remove_if_empty(path: Path) -> None:
    """rmdir `path` if it exists and is empty (an adapter dir left without versions)."""
    with contextlib.suppress(OSError):
        path.rmdir()


class _Abandoned(Exception):
    """A staged write stopped because the adapter failed validation meanwhile."""


