"""Durable, versioned adapter storage on a local filesystem.

Layout::

    root/<name>/v<version>/adapter_config.json
    root/<name>/v<version>/adapter_model.safetensors
    root/<name>/v<version>/manifest.json      written last; without it the version does not exist
    root/.staging/<random>/                    uploads being written (swept at start)
    root/.trash/<random>/                      adapters being deleted (swept at start)
    root/.versions/<name>                      last version of a deleted adapter (a tombstone)

A put writes and fsyncs the files in a staging dir, renames it to `v<N>`, then writes manifest.json
(temp file + fsync + rename). A crash at any point leaves the previous versions untouched and at
most an invisible version dir, which the next start removes. One process owns a root: writes are
serialized by a threading.Lock, readers take no lock. Versions start at 1 and grow by one; every
older version stays readable until the adapter is deleted (running requests keep theirs). Versions
never repeat for a name, even after a delete (the tombstone remembers the last one), so
(name, version) always identifies the same bytes and is a safe cache key.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from .archive import extract_adapter_files
from .errors import AdapterIntegrityError, AdapterNotFoundError, AdapterTooLargeError, InvalidAdapterNameError
from .fsio import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    fsync_dir,
    read_adapter_dir,
    read_regular_file,
    write_file_durable,
)
from .peft_format import parse_adapter
from .records import NAME_PATTERN, AdapterRecord, read_manifest, validate_name, write_manifest
from .spec import AdapterWeights, BaseModelSpec

_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,8})$")


class AdapterStore:
    """Versioned adapter directories under one root, written atomically."""

    def __init__(self, root: Path, spec: BaseModelSpec, max_rank: int, max_bytes: int):
        self.root = Path(root).resolve()
        self.spec, self.max_rank, self.max_bytes = spec, max_rank, max_bytes
        self._lock = threading.Lock()
        self._staging, self._trash = self.root / ".staging", self.root / ".trash"
        self._tombstones = self.root / ".versions"
        for path in (self.root, self._staging, self._trash, self._tombstones):
            path.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def put(self, name: str, config_bytes: bytes, safetensors_bytes: bytes) -> AdapterRecord:
        """Validate an adapter and store it as the next version of `name`."""
        adapter_dir = self._adapter_dir(name)
        size_bytes = len(config_bytes) + len(safetensors_bytes)
        if size_bytes > self.max_bytes:
            raise AdapterTooLargeError(f"adapter is {size_bytes} bytes, more than the {self.max_bytes}-byte limit")
        config, weights = parse_adapter(config_bytes, safetensors_bytes, self.spec, self.max_rank)
        sha256 = hashlib.sha256(safetensors_bytes).hexdigest()
        with self._lock:
            staging = self._staging / secrets.token_hex(8)
            staging.mkdir()
            try:
                write_file_durable(staging / CONFIG_FILE, config_bytes)
                write_file_durable(staging / WEIGHTS_FILE, safetensors_bytes)
                fsync_dir(staging)
                adapter_dir.mkdir(exist_ok=True)
                fsync_dir(self.root)
                version = max([*self._version_numbers(adapter_dir), self._deleted_version(name)]) + 1
                version_dir = adapter_dir / f"v{version}"
                os.rename(staging, version_dir)
                fsync_dir(adapter_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            record = AdapterRecord(
                name=name,
                version=version,
                sha256=sha256,
                rank=weights.rank,
                alpha=weights.alpha,
                use_rslora=weights.use_rslora,
                target_modules=config["target_modules"],
                size_bytes=size_bytes,
                created=int(time.time()),
                path=version_dir,
            )
            try:
                write_manifest(record)
            except BaseException:
                shutil.rmtree(version_dir, ignore_errors=True)
                raise
        return record

    def put_archive(self, name: str, archive_bytes: bytes) -> AdapterRecord:
        """Store an adapter uploaded as one .tar.gz or .zip archive (see archive.py for layout rules)."""
        self._adapter_dir(name)
        config_bytes, safetensors_bytes = extract_adapter_files(archive_bytes, self.max_bytes)
        return self.put(name, config_bytes, safetensors_bytes)

    def put_dir(self, name: str, src_dir: Path) -> AdapterRecord:
        """Store a copy of a PEFT adapter directory (symlinked files are refused)."""
        self._adapter_dir(name)
        config_bytes, safetensors_bytes = read_adapter_dir(Path(src_dir), self.max_bytes)
        return self.put(name, config_bytes, safetensors_bytes)

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """The latest (or the given) complete version of `name`."""
        records = self._records(self._adapter_dir(name))
        if not records:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        if version is None:
            return records[-1]
        for record in records:
            if record.version == version:
                return record
        raise AdapterNotFoundError(f"adapter {name!r} has no version {version}")

    def list(self) -> list[AdapterRecord]:
        """The latest version of every adapter, sorted by name."""
        latest = []
        for entry in sorted(os.listdir(self.root)):
            if NAME_PATTERN.fullmatch(entry) and (records := self._records(self.root / entry)):
                latest.append(records[-1])
        return latest

    def delete(self, name: str) -> None:
        """Remove every version of `name`: one atomic rename into .trash, then rmtree."""
        adapter_dir = self._adapter_dir(name)
        with self._lock:
            if not self._records(adapter_dir):
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            self._write_tombstone(name, max(self._version_numbers(adapter_dir)))
            doomed = self._trash / secrets.token_hex(8)
            os.rename(adapter_dir, doomed)
            fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def load_weights(self, record: AdapterRecord) -> AdapterWeights:
        """Read a stored version back as float32 tensors, after re-checking its sha256 and config."""
        config_bytes = read_regular_file(record.path / CONFIG_FILE, self.max_bytes)
        safetensors_bytes = read_regular_file(record.path / WEIGHTS_FILE, self.max_bytes)
        actual = hashlib.sha256(safetensors_bytes).hexdigest()
        if actual != record.sha256:
            raise AdapterIntegrityError(
                f"adapter {record.name!r} v{record.version}: {WEIGHTS_FILE} sha256 is {actual}, "
                f"manifest says {record.sha256}"
            )
        _, weights = parse_adapter(config_bytes, safetensors_bytes, self.spec, self.max_rank)
        stored = (record.rank, record.alpha, record.use_rslora)
        if (weights.rank, weights.alpha, weights.use_rslora) != stored:
            raise AdapterIntegrityError(f"adapter {record.name!r} v{record.version}: {CONFIG_FILE} changed on disk")
        return weights

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

    def _records(self, adapter_dir: Path) -> list[AdapterRecord]:
        """Complete versions of one adapter, oldest first."""
        records = []
        for version in sorted(self._version_numbers(adapter_dir)):
            record = read_manifest(adapter_dir.name, version, adapter_dir / f"v{version}")
            if record is not None:
                records.append(record)
        return records

    def _deleted_version(self, name: str) -> int:
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
        for parent in (self._staging, self._trash):
            for entry in os.listdir(parent):
                shutil.rmtree(parent / entry, ignore_errors=True)
        for entry in os.listdir(self._tombstones):
            if entry.startswith("."):
                os.unlink(self._tombstones / entry)
        for entry in os.listdir(self.root):
            adapter_dir = self.root / entry
            if not NAME_PATTERN.fullmatch(entry) or not adapter_dir.is_dir():
                continue
            for version in self._version_numbers(adapter_dir):
                version_dir = adapter_dir / f"v{version}"
                if read_manifest(entry, version, version_dir) is None:
                    shutil.rmtree(version_dir, ignore_errors=True)
            if not os.listdir(adapter_dir):
                adapter_dir.rmdir()
