"""Adapter names, the AdapterRecord of one stored version, and its manifest.json."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InvalidAdapterNameError
from .fsio import CONFIG_FILE, WEIGHTS_FILE, fsync_dir, write_file_durable

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_PATTERN = re.compile(NAME_RE)
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class AdapterRecord:
    """One stored, complete adapter version."""

    name: str
    version: int
    sha256: str  # of adapter_model.safetensors
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]  # sorted short names, e.g. ["k_proj", "q_proj"]
    size_bytes: int  # adapter_config.json + adapter_model.safetensors
    created: int  # unix seconds
    path: Path  # the version dir
    owner: str | None = None  # tenant that uploaded this version (None: stored before owners were kept)
    # sha256 of each digests.CHUNK_BYTES chunk of the weights, for a parallel re-check ([]: stored before)
    chunk_sha256: list[str] = field(default_factory=list)

    def to_public(self) -> dict:
        """The fields the HTTP API returns."""
        fields = asdict(self)
        del fields["path"], fields["use_rslora"], fields["owner"], fields["chunk_sha256"]
        return fields


def validate_name(name: str) -> str:
    """Return `name` if it matches NAME_RE, else raise InvalidAdapterNameError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapterNameError(f"invalid adapter name {name!r}: must match {NAME_RE}")
    return name


def write_manifest(record: AdapterRecord, sync: bool = True) -> None:
    """Write manifest.json last and atomically (temp file, fsync, rename, fsync dir; no fsync when not
    `sync`: still atomic, not durable)."""
    fields = asdict(record)
    fields.update(format=MANIFEST_FORMAT, path=None)
    data = json.dumps(fields, indent=2, sort_keys=True).encode()
    temp = record.path / (MANIFEST_FILE + ".tmp")
    write_file_durable(temp, data, sync=sync)
    os.rename(temp, record.path / MANIFEST_FILE)
    if sync:
        fsync_dir(record.path)


def read_manifest(name: str, version: int, version_dir: Path) -> AdapterRecord | None:
    """The record of a complete version, or None when the manifest is missing or invalid."""
    try:
        fields = json.loads((version_dir / MANIFEST_FILE).read_bytes())
        is_current = fields.pop("format") == MANIFEST_FORMAT
        if not is_current or (fields["name"], fields["version"]) != (name, version):
            return None
        fields["path"] = version_dir
        record = AdapterRecord(**fields)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not all((version_dir / file).is_file() for file in (CONFIG_FILE, WEIGHTS_FILE)):
        return None
    return record
