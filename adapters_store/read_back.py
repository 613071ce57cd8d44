"""Reading a stored adapter version back (`AdapterStore.load_weights`): the files re-read, their bytes
re-checked against the manifest's digests, the tensors mapped into the caller's memory."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import wait as futures_wait

import torch

from . import digests
from .errors import AdapterError, AdapterIntegrityError, AdapterValidationError
from .fsio import CONFIG_FILE, WEIGHTS_FILE, read_regular_file, read_regular_file_writable
from .paged_read import read_paged
from .peft_format import adapter_from_header, parse_adapter, parse_config
from .records import AdapterRecord
from .spec import AdapterWeights, BaseModelSpec


def load_weights(record: AdapterRecord, spec: BaseModelSpec, max_rank: int, max_bytes: int,
                 allocate: Callable[[int], torch.Tensor] | None = None, page_bytes: int = 0,
                 timings: dict[str, float] | None = None) -> AdapterWeights:
    """Read a stored version back (tensors in the file's dtype), after re-checking its sha256 and config.

    The cold-adapter path (issue 15: disk to first token within 60 ms at 8B rank 16, 84 MB): the
    sha256 of each chunk (`digests`) is checked on worker threads while the tensors are mapped, and
    the NaN/Inf scan of the upload is not repeated, since matching bytes are the bytes that passed
    it. Nothing is returned before every digest matches. With `allocate` (blocks of uint8 of at least
    `page_bytes`: the CPU tier's pinned pages), the file is read straight into such blocks and the
    tensors are views of them (`paged_read`); else into one buffer of its own. `timings`, when given,
    receives the seconds from the start at which each stage ended (header, parsed, checked) and, paged,
    the seconds the page allocations took (alloc_total, part of the header stage)."""
    start = time.perf_counter()
    config_bytes = read_regular_file(record.path / CONFIG_FILE, max_bytes)
    if allocate is not None:
        try:
            paged = read_paged(record.path / WEIGHTS_FILE, max_bytes, page_bytes, allocate,
                               hash_chunks=bool(record.chunk_sha256))
        except AdapterValidationError as exc:  # it passed at upload: the file changed since
            raise AdapterIntegrityError(f"adapter {record.name!r} v{record.version}: {exc}") from None

        @functools.cache
        def checks() -> list[str]:
            chunks = [read.result() for read in paged.reads]  # a short read raises here
            return chunks if record.chunk_sha256 else [digests.sha256_of(paged.segments)]

        def parse():
            try:
                return adapter_from_header(parse_config(config_bytes, spec, max_rank),
                                           paged.header, paged.tensors, spec, check_finite=False)[1]
            except BaseException:
                futures_wait(paged.reads)  # no read may still write into pages the caller frees
                raise
    else:
        safetensors_bytes = read_regular_file_writable(record.path / WEIGHTS_FILE, max_bytes)
        futures = (digests.submit_chunks(safetensors_bytes) if record.chunk_sha256
                   else [digests.submit_whole(safetensors_bytes)])

        def checks() -> list[str]:
            return digests.results(futures)

        def parse():
            return parse_adapter(config_bytes, safetensors_bytes, spec, max_rank,
                                 check_finite=False)[1]
    expected = list(record.chunk_sha256) if record.chunk_sha256 else [record.sha256]
    marks = timings if timings is not None else {}
    marks["header"] = time.perf_counter() - start
    if allocate is not None:
        marks["alloc_total"] = paged.alloc_seconds  # a duration (inside "header"), not an end
    try:
        weights = parse()
    except AdapterError:
        if _digests(checks, record) == expected:
            raise
    marks["parsed"] = time.perf_counter() - start
    digests_found = _digests(checks, record)
    marks["checked"] = time.perf_counter() - start
    if digests_found != expected:  # bytes that changed on disk say so first
        raise AdapterIntegrityError(
            f"adapter {record.name!r} v{record.version}: {WEIGHTS_FILE} changed on disk (its sha256 no "
            f"longer matches the manifest's, which says {record.sha256})"
        )
    stored = (record.rank, record.alpha, record.use_rslora)
    if (weights.rank, weights.alpha, weights.use_rslora) != stored:
        raise AdapterIntegrityError(f"adapter {record.name!r} v{record.version}: {CONFIG_FILE} changed on disk")
    return weights


def _digests(checks: Callable[[], list[str]], record: AdapterRecord) -> list[str]:
    """The digests a read-back computed; a file that ended early (it changed since) is an integrity error."""
    try:
        return checks()
    except AdapterValidationError as exc:
        raise AdapterIntegrityError(f"adapter {record.name!r} v{record.version}: {exc}") from None
