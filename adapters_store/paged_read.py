"""Read a stored safetensors file straight into pages the caller allocates (the CPU tier's pinned pages).

The plain read-back (`fsio.read_regular_file_writable`) fills a fresh buffer: for an 84 MB adapter that
is 20,000 first-touch page faults (the read ran at about 1 GB/s on the dev CPU), and the tier then copied
every tensor again into pinned memory. Here the header is read first, the tensors are grouped in file
order into runs of at most one page (a tensor larger than a page gets a block of its own), and the bytes
go with `preadv` into their pages, which are already faulted in and locked: the tensors are views of the
pages, nothing is copied twice. `segments` covers the whole file in order, for the digests.

The reads run on worker threads of their own, one task per `digests.CHUNK_BYTES` chunk of the file, and each task
hashes its chunk as soon as it has read it, while the bytes are still in the core's cache: on the H200
host one thread read 84 MB into pages in ~17 ms and then the chunk hashes took ~20 ms more
(`bench.cold_load`, stage `load_pages` 35-40 ms); eleven chunks read and hashed at once take about
one chunk's time.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import digests
from .errors import AdapterValidationError
from .fsio import open_regular
from .safetensors_check import DTYPE_SIZES, MAX_HEADER_BYTES, TORCH_DTYPES, read_header_of

# The read-back's own threads (not the uploads' hashing pool, digests._POOL): a cold adapter's reads do
# not queue behind the chunk hashes of an upload in progress (128 tasks for 1 GB).
_READS = ThreadPoolExecutor(max_workers=max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="loraplex-read")


@dataclass
class PagedFile:
    header: dict[str, dict]
    segments: list[memoryview]  # the file's bytes, in order, without gaps (filled once `reads` are done)
    # One per digests.CHUNK_BYTES chunk of the file, done once the chunk is read: its sha256 hex digest
    # (None when the reader did not ask for digests); a short read raises AdapterValidationError there.
    reads: list[Future]
    alloc_seconds: float = 0.0  # spent in `allocate` (pinned pages: PyTorch's cache, or the driver when it misses)
    _layout: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)  # (tensor, its block, run begin)
    _tensors: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file as a view of the allocated pages, once every read is done."""
        if self._tensors is None:
            for read in self.reads:
                read.result()
            tensors = {name: _tensor(self.header[name], block, begin) for name, block, begin in self._layout}
            for name, entry in self.header.items():
                if name not in tensors:  # empty tensors take no bytes
                    tensors[name] = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
            self._tensors = tensors
        return self._tensors


def read_paged(path: Path, max_bytes: int, page_bytes: int, allocate: Callable[[int], torch.Tensor],
               hash_chunks: bool = True) -> PagedFile:
    """Start reading a safetensors file into `allocate(n)` blocks of uint8 (`page_bytes` each, or a
    tensor's size when it is larger); the header is read and checked (as `read_header` does) before this
    returns, the rest is read on worker threads (`PagedFile.reads`), hashed by chunk if `hash_chunks`."""
    handle, size = open_regular(path, max_bytes)
    try:
        fd = handle.fileno()
        prefix = _pread(fd, min(8, size), 0)
        (header_len,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        head = prefix + _pread(fd, min(header_len, MAX_HEADER_BYTES, max(0, size - 8)), 8)
        header = read_header_of(head, size)
    except BaseException:
        handle.close()
        raise
    data_start = 8 + header_len
    segments, layout = [memoryview(head)], []
    try:
        alloc_seconds = _plan(header, data_start, size, page_bytes, allocate, segments, layout)
    except BaseException:  # an allocation failed: nothing is being read yet
        handle.close()
        raise
    reads: list[Future] = []
    try:
        for pieces in digests.chunks_of(segments):
            reads.append(_READS.submit(_read_chunk, fd, pieces, hash_chunks))
    except BaseException:  # the pool refused (shutting down): no read may outlive this call
        futures_wait(reads)
        handle.close()
        raise
    _close_when_done(handle, reads)
    return PagedFile(header, segments, reads, alloc_seconds, layout)


def _plan(header: dict[str, dict], data_start: int, size: int, page_bytes: int,
          allocate: Callable[[int], torch.Tensor], segments: list[memoryview], layout: list) -> float:
    """Allocate the blocks the tensors go to and lay the file out as `segments` (after the header's);
    fills `layout` with (tensor, block, run begin); returns the seconds spent allocating."""
    cursor, alloc_seconds = len(segments[0]), 0.0
    for run in _runs(header, page_bytes):
        begin, end = header[run[0]]["data_offsets"][0], header[run[-1]]["data_offsets"][1]
        if data_start + begin > cursor:  # bytes no tensor claims: read for the digests only
            segments.append(memoryview(bytearray(data_start + begin - cursor)))
        started = time.perf_counter()
        block = allocate(max(page_bytes, end - begin))
        alloc_seconds += time.perf_counter() - started
        segments.append(memoryview(block.numpy())[: end - begin])
        cursor = data_start + end
        layout += [(name, block, begin) for name in run]
    if cursor < size:
        segments.append(memoryview(bytearray(size - cursor)))
    return alloc_seconds


def _read_chunk(fd: int, pieces: list[tuple[int, int, memoryview]], hash_it: bool) -> str | None:
    """Read one chunk's pieces (segment 0, the header, is read already) in one scattering `preadv`, then
    hash the chunk. Few calls, because each is a release and a retake of the GIL, which a busy engine
    thread holds: under load a retake waits up to the switch interval."""
    to_read = [(offset, view) for segment, offset, view in pieces if segment]
    if to_read:
        _preadv_into(fd, [view for _, view in to_read], to_read[0][0])
    return digests.sha256_of([view for _, _, view in pieces]) if hash_it else None


def _preadv_into(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill `views`, which hold the file's bytes from `offset` one after the other."""
    while views:
        count = os.preadv(fd, views, offset)
        if count == 0:
            missing = sum(len(view) for view in views)
            raise AdapterValidationError(f"file ended {missing} bytes early (it changed while read)")
        offset += count
        while views and count >= len(views[0]):
            count -= len(views[0])
            views = views[1:]
        if views and count:
            views = [views[0][count:], *views[1:]]


def _close_when_done(handle, futures: list[Future]) -> None:
    if not futures:
        handle.close()
        return
    lock, remaining = threading.Lock(), [len(futures)]

    def one_done(_future):
        with lock:  # done callbacks run on the worker threads
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            handle.close()

    for future in futures:
        future.add_done_callback(one_done)


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
