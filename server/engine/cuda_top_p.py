"""The top-p radix passes and the draw in CUDA (csrc/top_p.cu), the same buffers and integers as the Triton
kernels of server.engine.triton_top_p, which stay the reference and the fallback.

Built at first use with nvcc into a plain shared library (no torch headers, a few seconds), cached beside torch's
extensions (TORCH_EXTENSIONS_DIR) under a digest of the source and the GPU architecture, and called through
ctypes on the current stream: CUDA graphs capture it like any other launch. Needs nvcc; `available()` says
whether it built. LORAPLEX_TOP_P_CUDA=0 keeps the Triton kernels. The CPU never builds or loads it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "top_p.cu"
DIGIT_BITS = 5  # the digit the CUDA histogram pass settles (kDigitBits in csrc/top_p.cu)
MAX_CHUNKS = 256  # chunks a row the kernels take (kMaxChunks)


def enabled() -> bool:
    return os.environ.get("LORAPLEX_TOP_P_CUDA", "1") != "0"


def _nvcc() -> str:
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    raise RuntimeError("nvcc not found (PATH, CUDA_HOME)")


def _build(major: int, minor: int) -> Path:
    """The shared library for sm_{major}{minor}, compiled once into the extension cache (atomic rename, so that
    processes building at once each find a whole file)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    target = root / f"loraplex_top_p_{digest}_sm{major}{minor}" / "libloraplex_top_p.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
        command = [_nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", arch, "-o", str(built), str(SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
        os.replace(built, target)
    return target


_POINTER, _INT, _LONG = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong


def _load(path: Path) -> ctypes.PyDLL:
    # PyDLL: the calls keep the GIL. A launch takes microseconds; with ctypes.CDLL each call let go of the GIL and
    # waited to take it back from the engine's other threads: a temperature-only draw's host time went 360 -> 703
    # us with one such call (H200, bench.sampler_profile, fifteenth session).
    lib = ctypes.PyDLL(str(path))
    lib.loraplex_top_p_histogram_pass.argtypes = [_INT, _POINTER] + [_POINTER] * 8 + [_INT, _INT, _LONG] + [_INT] * 4
    lib.loraplex_top_p_cut_stats.argtypes = [_INT, _POINTER] + [_POINTER] * 6 + [_INT, _INT]
    lib.loraplex_top_p_draw.argtypes = [_INT, _POINTER] + [_POINTER] * 6 + [_INT, _INT, _LONG, _INT, _INT]
    return lib


@functools.cache
def _library(device_index: int) -> ctypes.PyDLL:
    return _load(_build(*torch.cuda.get_device_capability(device_index)))


@functools.cache
def _available(device_index: int) -> bool:
    try:
        _library(device_index)
    except Exception as exc:  # no nvcc, or a failed build: the Triton kernels serve instead
        log.warning("the CUDA top-p kernels did not build (%s); the Triton ones serve instead", exc)
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether the CUDA kernels serve tensors on `device` (CUDA, built, not turned off)."""
    return device.type == "cuda" and enabled() and _available(device.index or 0)


def _launch_args(tensor: torch.Tensor) -> tuple[ctypes.PyDLL, int, int]:
    index = tensor.device.index or 0
    return _library(index), index, torch.cuda.current_stream(tensor.device).cuda_stream


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"CUDA top-p {what} launch failed: cudaError {err}")


def histogram_pass(probs, top_p, stats_in, prefix_in, above_in, stats, prefix, above,
                   num_chunks: int, chunk: int, shift: int, first: bool) -> None:
    """One radix pass over probs [R, vocab] (rows contiguous): triton_top_p._histogram_kernel's contract."""
    lib, index, stream = _launch_args(probs)
    num_rows, vocab = probs.shape
    _check(lib.loraplex_top_p_histogram_pass(
        index, stream, probs.data_ptr(), top_p.data_ptr(), stats_in.data_ptr(), prefix_in.data_ptr(),
        above_in.data_ptr(), stats.data_ptr(), prefix.data_ptr(), above.data_ptr(), num_rows, vocab,
        probs.stride(0), num_chunks, chunk, shift, int(first)), "histogram pass")  # fmt: skip


def cut_stats(top_p, stats_in, prefix_in, above_in, cut, per_chunk, num_chunks: int) -> None:
    """The cut and each chunk's mass above it and ties at it, from the last pass: triton_top_p._cut_stats_kernel's
    contract."""
    lib, index, stream = _launch_args(top_p)
    _check(lib.loraplex_top_p_cut_stats(
        index, stream, top_p.data_ptr(), stats_in.data_ptr(), prefix_in.data_ptr(), above_in.data_ptr(),
        cut.data_ptr(), per_chunk.data_ptr(), top_p.shape[0], num_chunks), "cut statistics")


def draw(probs, top_p, uniform, cut, per_chunk, out, num_chunks: int, chunk: int) -> None:
    """The draw over probs [R, vocab] from the cut and each chunk's statistics: triton_top_p._draw_kernel's."""
    lib, index, stream = _launch_args(probs)
    num_rows, vocab = probs.shape
    _check(lib.loraplex_top_p_draw(
        index, stream, probs.data_ptr(), top_p.data_ptr(), uniform.data_ptr(), cut.data_ptr(),
        per_chunk.data_ptr(), out.data_ptr(), num_rows, vocab, probs.stride(0), num_chunks, chunk), "draw")
