"""The top-p radix passes and the draw in CUDA (csrc/top_p.cu), the same buffers and integers as the Triton
kernels of server.kernels.sampling.triton_top_p, which stay the reference and the fallback.

Built at first use with nvcc into a plain shared library (no torch headers, a few seconds), cached beside torch's
extensions (TORCH_EXTENSIONS_DIR) under a digest of the source and the GPU architecture, and called through
ctypes on the current stream: CUDA graphs capture it like any other launch. Needs nvcc; `available()` says
whether it built. LORAPLEX_TOP_P_CUDA=0 keeps the Triton kernels. The CPU never builds or loads it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "top_p.cu"
DIGIT_BITS = 5  # the digit the CUDA histogram pass settles (kDigitBits in csrc/top_p.cu)
DIGITS = 1 << DIGIT_BITS
MAX_CHUNKS = 256  # chunks a row the kernels take (kMaxChunks)


def enabled() -> bool:
    return os.environ.get("LORAPLEX_TOP_P_CUDA", "1") != "0"


def _build(major: int, minor: int) -> Path:
    """The shared library for sm_{major}{minor}, compiled once into the extension cache."""
    from server import nvcc_library

    return nvcc_library.build(SOURCE, "loraplex_top_p", major, minor)


_POINTER, _INT, _LONG = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong


def _load(path: Path) -> ctypes.PyDLL:
    # PyDLL: the calls keep the GIL. A call only launches kernels; with ctypes.CDLL each call let go of the GIL and
    # waited to take it back from the engine's other threads: a temperature-only draw's host time went 360 -> 703
    # us with one such call (H200, bench.sampler_profile, fifteenth session).
    lib = ctypes.PyDLL(str(path))
    lib.loraplex_top_p_workspace_size.argtypes = [_INT, _INT]
    lib.loraplex_top_p_workspace_size.restype = _LONG
    lib.loraplex_top_p_cut.argtypes = [_INT, _POINTER] + [_POINTER] * 3 + [_INT, _INT, _LONG, _INT, _INT]
    lib.loraplex_top_p_draw.argtypes = [_INT, _POINTER] + [_POINTER] * 5 + [_INT, _INT, _LONG, _INT, _INT]
    return lib


@functools.cache
def _library(device_index: int) -> ctypes.PyDLL:
    return _load(_build(*torch.cuda.get_device_capability(device_index)))


@functools.cache
def _available(device_index: int) -> bool:
    try:
        _library(device_index)
    except Exception:  # no nvcc, or a failed build: the Triton kernels serve instead
        log.exception("the CUDA top-p kernels did not build; the Triton ones serve instead")
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether the CUDA kernels serve tensors on `device` (CUDA, built, not turned off)."""
    return device.type == "cuda" and enabled() and _available(device.index or 0)


def workspace_size(num_rows: int, num_chunks: int) -> int:
    """int64 elements of a draw's workspace (csrc/top_p.cu, struct Workspace): two halves of per-chunk digit
    histograms, masses above the prefix and prefixes for the radix passes, then the cut and per-chunk statistics."""
    return num_rows * (2 * num_chunks * DIGITS + 4 * num_chunks + 3)


def _views(work: torch.Tensor, num_rows: int, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cut [R] int32, per_chunk [R * chunks * 2] int64) inside a workspace, where the kernels leave them."""
    cells = num_rows * num_chunks
    start = 2 * (cells * DIGITS + cells + num_rows)
    cut = work[start:start + num_rows].view(torch.int32)[:num_rows]
    return cut, work[start + num_rows:start + num_rows + 2 * cells]


def _call(function, probs: torch.Tensor, *pointers, num_chunks: int, chunk: int) -> None:
    index = probs.device.index or 0
    num_rows, vocab = probs.shape
    err = function(index, torch.cuda.current_stream(probs.device).cuda_stream, probs.data_ptr(), *pointers,
                   num_rows, vocab, probs.stride(0), num_chunks, chunk)
    if err:
        raise RuntimeError(f"CUDA top-p launch failed: cudaError {err}")


def cut(probs: torch.Tensor, top_p: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The radix passes and the cut's statistics over probs [R, vocab] (rows contiguous): (cut, per_chunk) as
    triton_top_p.top_p_cut returns them."""
    num_rows, vocab = probs.shape
    num_chunks = -(-vocab // chunk)
    work = torch.empty(workspace_size(num_rows, num_chunks), dtype=torch.int64, device=probs.device)
    top_p = top_p.to(torch.float32).contiguous()
    _call(_library(probs.device.index or 0).loraplex_top_p_cut, probs, top_p.data_ptr(), work.data_ptr(),
          num_chunks=num_chunks, chunk=chunk)
    return _views(work, num_rows, num_chunks)


def draw(probs: torch.Tensor, top_p: torch.Tensor | None, uniform: torch.Tensor, chunk: int) -> torch.Tensor:
    """Token ids [R] int64, as triton_top_p.top_p_draw (top_p given) or full_draw (None) draw them: every launch of
    the draw in one call (one workspace, no per-kernel host work)."""
    num_rows, vocab = probs.shape
    num_chunks = -(-vocab // chunk)
    work = torch.empty(workspace_size(num_rows, num_chunks), dtype=torch.int64, device=probs.device)
    out = torch.empty(num_rows, dtype=torch.int64, device=probs.device)
    top_p_ptr = None if top_p is None else (top_p := top_p.to(torch.float32).contiguous()).data_ptr()
    uniform = uniform.to(torch.float32).contiguous()
    _call(_library(probs.device.index or 0).loraplex_top_p_draw, probs, top_p_ptr, uniform.data_ptr(),
          work.data_ptr(), out.data_ptr(), num_chunks=num_chunks, chunk=chunk)
    return out
