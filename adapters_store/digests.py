"""sha256 of adapter weights, whole and in chunks hashed in parallel.

The whole-file sha256 is what the API reports and what a client can check. Reading a stored version
back (a cold adapter, issue 15: disk to first token within 60 ms at 8B rank 16, 84 MB) re-checks the
bytes, and one sha256 stream over 84 MB is 40-50 ms of one core, most of that budget. So the manifest
also keeps the sha256 of every CHUNK_BYTES chunk, computed at upload, and the read-back checks the
chunks on several threads at once (hashlib releases the GIL): the same guarantee, any changed byte is
caught, in a fraction of the time. Versions stored before the chunk list existed are checked whole.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor

CHUNK_BYTES = 8 << 20
# Shared by every put of the process (a paged read-back has its own pool: paged_read): threads are
# started once, not per upload. Up to 16: an 84 MB adapter is 11 chunks, one round on the GPU host.
_POOL = ThreadPoolExecutor(max_workers=max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="loraplex-sha256")


def submit_whole(data) -> Future:
    """The sha256 hex digest of `data`, on a worker thread."""
    return submit_whole_of([data])


def submit_chunks(data) -> list[Future]:
    """The sha256 hex digest of every CHUNK_BYTES chunk of `data`, in order, on worker threads."""
    return submit_chunks_of([data])


def sha256_of(pieces: list[memoryview]) -> str:
    """The sha256 hex digest of the bytes `pieces` hold one after the other."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def submit_whole_of(segments: list[memoryview]) -> Future:
    """`submit_whole` of the bytes that `segments` hold one after the other."""
    return _POOL.submit(sha256_of, segments)


def submit_chunks_of(segments: list[memoryview]) -> list[Future]:
    """`submit_chunks` of the bytes that `segments` hold one after the other (a file read in pieces)."""
    return [_POOL.submit(sha256_of, [view for _, _, view in pieces]) for pieces in chunks_of(segments)]


def chunks_of(segments: list[memoryview]) -> list[list[tuple[int, int, memoryview]]]:
    """The CHUNK_BYTES chunks of the bytes `segments` hold one after the other, each as its pieces:
    (index of the segment the piece is part of, offset of the piece in the whole, view of the piece)."""
    chunks: list[list[tuple[int, int, memoryview]]] = [[]]
    room, offset = CHUNK_BYTES, 0
    for index, segment in enumerate(segments):
        view = memoryview(segment).cast("B")
        while len(view):
            if room == 0:
                chunks.append([])
                room = CHUNK_BYTES
            piece, view = view[:room], view[room:]
            chunks[-1].append((index, offset, piece))
            room -= len(piece)
            offset += len(piece)
    return [pieces for pieces in chunks if pieces]


def results(futures: list[Future]) -> list[str]:
    return [f.result() for f in futures]
