"""Read the two adapter files out of an uploaded .tar.gz or .zip, in memory and bounded.

Layout rules (nothing is ever extracted to disk, but unsafe archives are still refused):
- files lie at the archive root, or all inside one top-level folder (`tar czf a.tgz my-adapter/`);
  any deeper nesting, or root files mixed with a folder, is rejected;
- links (symbolic or hard), devices, absolute paths, backslashes and `..` components are rejected;
- other files (README.md, tokenizer files, training_args.bin) are ignored and never read, but their
  declared sizes count toward the limit; a pickle checkpoint without a safetensors file is rejected;
- the uncompressed size is bounded twice: by the sizes the archive declares and by counting the
  bytes actually decompressed, so a zip/gzip bomb stops at the limit. The limit is max_bytes, and
  also MAX_EXPANSION times the archive's own size (at least EXPANSION_FLOOR bytes): adapter weights
  barely compress (about 1.1x; 2x for an untrained adapter whose B is zero), so a 500 KB archive
  that expands to 500 MB is a bomb, refused after reading at most 20x its size, not after 500 MB.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
import zlib

from .errors import AdapterTooLargeError, AdapterValidationError
from .fsio import CONFIG_FILE, PICKLE_WEIGHT_FILES, WEIGHTS_FILE

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
MAX_MEMBERS = 1000
WANTED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Tar headers and padding add up to 1.5 KiB per member plus trailing zero records.
_TAR_OVERHEAD = MAX_MEMBERS * 1536 + (1 << 20)
_CHUNK = 1 << 20
MAX_EXPANSION = 20
EXPANSION_FLOOR = 8 << 20


def uncompressed_limit(archive_size: int, max_bytes: int) -> int:
    """The most bytes an archive of `archive_size` bytes may expand to."""
    return min(max_bytes, max(EXPANSION_FLOOR, MAX_EXPANSION * archive_size))


def extract_adapter_files(archive_bytes: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    """Return (adapter_config.json, adapter_model.safetensors) bytes from a .tar.gz or .zip archive."""
    limit = _Limit(uncompressed_limit(len(archive_bytes), max_bytes), max_bytes, len(archive_bytes))
    if archive_bytes.startswith(GZIP_MAGIC):
        names, contents = _read_tar_gz(archive_bytes, limit)
    elif archive_bytes.startswith(ZIP_MAGICS):
        names, contents = _read_zip(archive_bytes, limit)
    else:
        raise AdapterValidationError("archive is neither a .tar.gz nor a .zip file")
    prefix = _root_prefix(names)
    missing = [name for name in WANTED_FILES if prefix + name not in contents]
    if WEIGHTS_FILE in missing and any(prefix + name in names for name in PICKLE_WEIGHT_FILES):
        raise AdapterValidationError(
            "archive holds a pickle checkpoint (.bin/.pt), which is not accepted; save with safe_serialization=True"
        )
    if missing:
        raise AdapterValidationError(f"archive has no {' or '.join(missing)} at its root")
    return contents[prefix + CONFIG_FILE], contents[prefix + WEIGHTS_FILE]


def _normalize(name: str) -> str:
    """Member name without './' and trailing '/', after refusing absolute, '..' and backslash paths."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise AdapterValidationError(f"archive member {name!r} has an absolute path")
    if "\\" in name or "\x00" in name:
        raise AdapterValidationError(f"archive member {name!r} has a backslash or NUL in its path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise AdapterValidationError(f"archive member {name!r} has a '..' path component")
    if not parts:
        raise AdapterValidationError(f"archive member {name!r} has an empty path")
    return "/".join(parts)


def _root_prefix(names: list[str]) -> str:
    """'' for files at the root, 'folder/' for one top-level folder; anything else is rejected."""
    if not names:
        raise AdapterValidationError("archive contains no files")
    if any("/" not in name for name in names):
        nested = [name for name in names if "/" in name]
        if nested:
            raise AdapterValidationError(f"archive member {nested[0]!r} is nested; files must lie at the root")
        return ""
    folders = {name.split("/", 1)[0] for name in names}
    deep = [name for name in names if name.count("/") > 1]
    if len(folders) > 1 or deep:
        bad = deep[0] if deep else sorted(names)[-1]
        raise AdapterValidationError(
            f"archive member {bad!r} is nested; files must lie at the root or in one top-level folder"
        )
    return folders.pop() + "/"


def _add_member(name: str, names: list[str], seen: set[str]) -> bool:
    """Record a file member; True when its content is one the adapter needs."""
    if name in seen:
        raise AdapterValidationError(f"archive member {name!r} appears twice")
    seen.add(name)
    names.append(name)
    if len(names) > MAX_MEMBERS:
        raise AdapterValidationError(f"archive has more than {MAX_MEMBERS} files")
    return name.rsplit("/", 1)[-1] in WANTED_FILES and name.count("/") <= 1


class _Limit:
    """The uncompressed-size bound of one archive, and the error that names why it is that size."""

    def __init__(self, num_bytes: int, max_bytes: int, archive_size: int):
        self.num_bytes, self.max_bytes, self.archive_size = num_bytes, max_bytes, archive_size

    def exceeded(self) -> AdapterTooLargeError:
        if self.num_bytes < self.max_bytes:
            return AdapterTooLargeError(
                f"archive expands to more than {self.num_bytes} bytes, over {MAX_EXPANSION}x its own "
                f"{self.archive_size} bytes (a compression bomb?); send {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"as multipart parts instead"
            )
        return AdapterTooLargeError(f"archive content exceeds the {self.max_bytes}-byte limit when uncompressed")


def _read_bounded(handle: io.BufferedIOBase, budget: int, limit: _Limit) -> bytes:
    chunks, total = [], 0
    while chunk := handle.read(min(_CHUNK, budget - total + 1)):
        total += len(chunk)
        if total > budget:
            raise limit.exceeded()
        chunks.append(chunk)
    return b"".join(chunks)


class _BoundedStream(io.RawIOBase):
    """Counts decompressed bytes and stops a gzip bomb at `num_bytes`."""

    def __init__(self, raw: io.BufferedIOBase, num_bytes: int, limit: _Limit):
        self._raw, self._num_bytes, self._limit, self.count = raw, num_bytes, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        num_read = self._raw.readinto(buffer)
        self.count += num_read
        if self.count > self._num_bytes:
            raise self._limit.exceeded()
        return num_read


def _read_tar_gz(data: bytes, limit: _Limit) -> tuple[list[str], dict[str, bytes]]:
    names: list[str] = []
    seen: set[str] = set()
    contents: dict[str, bytes] = {}
    declared = 0
    stream = _BoundedStream(gzip.GzipFile(fileobj=io.BytesIO(data)), limit.num_bytes + _TAR_OVERHEAD, limit)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                name = _normalize(member.name)
                if member.issym() or member.islnk():
                    raise AdapterValidationError(f"archive member {member.name!r} is a link; links are not accepted")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise AdapterValidationError(f"archive member {member.name!r} is not a regular file")
                declared += member.size
                if declared > limit.num_bytes:
                    raise limit.exceeded()
                if _add_member(name, names, seen):
                    handle = archive.extractfile(member)
                    budget = limit.num_bytes - sum(map(len, contents.values()))
                    contents[name] = _read_bounded(handle, budget, limit)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise AdapterValidationError(f"archive is not a valid .tar.gz: {exc}") from None
    return names, contents


def _read_zip(data: bytes, limit: _Limit) -> tuple[list[str], dict[str, bytes]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise AdapterValidationError(f"archive is not a valid .zip: {exc}") from None
    names: list[str] = []
    seen: set[str] = set()
    wanted = []
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise AdapterValidationError(f"archive has more than {MAX_MEMBERS} files")
        for info in infos:
            name = _normalize(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise AdapterValidationError(f"archive member {info.filename!r} is a link; links are not accepted")
            if info.is_dir():
                continue
            if _add_member(name, names, seen):
                wanted.append((name, info))
        if sum(info.file_size for info in infos) > limit.num_bytes:
            raise limit.exceeded()
        contents: dict[str, bytes] = {}
        try:
            for name, info in wanted:
                with archive.open(info) as handle:
                    budget = limit.num_bytes - sum(map(len, contents.values()))
                    contents[name] = _read_bounded(handle, budget, limit)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as exc:
            raise AdapterValidationError(f"archive member could not be read: {exc}") from None
    return names, contents
