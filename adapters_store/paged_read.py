"""Read a stored safetensors file straight into pages the caller allocates (the CPU tier's pinned pages).

The plain read-back (`fsio.read_regular_file_writable`) fills a fresh buffer: for an 84 MB adapter that
is 20,000 first-touch page faults (the read ran at about 1 GB/s on the dev CPU), and the tier then copied
every tensor again into pinned memory. Here the header is read first, the tensors are grouped in file
order into runs of at most one page (a tensor larger than a page gets a block of its own), and each run
is read with one `preadv` into its page, which is already faulted in and locked: the tensors are views
of the pages, nothing is copied twice. `segments` covers the whole file in order, for the digests.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterValidationError
from .fsio import open_regular
from .safetensors_check import DTYPE_SIZES, MAX_HEADER_BYTES, TORCH_DTYPES, read_header_of


@dataclass
class PagedFile:
    header: dict[str, dict]
    tensors: dict[str, torch.Tensor]  # views of the allocated pages
    segments: list[memoryview]  # the file's bytes, in order, without gaps
    size: int


def read_paged(path: Path, max_bytes: int, page_bytes: int,
               allocate: Callable[[int], torch.Tensor]) -> PagedFile:
    """Read a safetensors file into `allocate(n)` blocks of uint8 (`page_bytes` each, or a tensor's size
    when it is larger); the header is checked as `read_header` does."""
    handle, size = open_regular(path, max_bytes)
    with handle:
        fd = handle.fileno()
        prefix = _pread(fd, min(8, size), 0)
        (header_len,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        head = prefix + _pread(fd, min(header_len, MAX_HEADER_BYTES, max(0, size - 8)), 8)
        header = read_header_of(head, size)
        data_start = 8 + header_len
        segments, cursor, tensors = [memoryview(head)], len(head), {}
        for run in _runs(header, page_bytes):
            begin, end = header[run[0]]["data_offsets"][0], header[run[-1]]["data_offsets"][1]
            if data_start + begin > cursor:  # bytes no tensor claims: read for the digests only
                segments.append(memoryview(_pread(fd, data_start + begin - cursor, cursor)))
            block = allocate(max(page_bytes, end - begin))
            view = memoryview(block.numpy())[: end - begin]
            _pread_into(fd, view, data_start + begin)
            segments.append(view)
            cursor = data_start + end
            for name in run:
                tensors[name] = _tensor(header[name], block, begin)
        if cursor < size:
            segments.append(memoryview(_pread(fd, size - cursor, cursor)))
        for name, entry in header.items():
            if name not in tensors:  # empty tensors take no bytes
                tensors[name] = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
    return PagedFile(header, tensors, segments, size)


def _runs(header: dict[str, dict], page_bytes: int) -> list[list[str]]:
    """Non-empty tensors in file order, grouped into runs that span at most one page (or one tensor)."""
    entries = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items()
                     if e["data_offsets"][1] > e["data_offsets"][0])
    runs: list[list[str]] = []
    run_begin = 0
    for begin, end, name in entries:
        if runs and end - run_begin <= page_bytes:
            runs[-1].append(name)
        else:
            runs.append([name])
            run_begin = begin
    return runs


def _tensor(entry: dict, block: torch.Tensor, run_begin: int) -> torch.Tensor:
    dtype, size = TORCH_DTYPES[entry["dtype"]], DTYPE_SIZES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    raw = block[begin - run_begin : end - run_begin]
    if (begin - run_begin) % size:  # misaligned for its dtype: an aligned copy (as load_tensors does)
        raw = raw.clone()
    return raw.view(dtype).view(entry["shape"])


def _pread(fd: int, count: int, offset: int) -> bytes:
    buffer = bytearray(count)
    _pread_into(fd, memoryview(buffer), offset)
    return bytes(buffer)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    filled = 0
    while filled < len(view):
        count = os.preadv(fd, [view[filled:]], offset + filled)
        if count == 0:
            raise AdapterValidationError(f"file ended {len(view) - filled} bytes early (it changed while read)")
        filled += count
