"""The CUDA top-p library off the GPU: csrc/top_p.cu builds with nvcc where there is one (so a compile error shows
here rather than on the GPU machine), its workspace has the size the Python views assume, and CPU tensors never
take it."""

from __future__ import annotations

import shutil

import pytest
import torch

from server.kernels.sampling import cuda_top_p


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_library_builds_once_and_sizes_its_workspace_as_python_does(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cuda_top_p._build(9, 0)
    assert path.is_relative_to(tmp_path) and path.stat().st_size > 0
    assert cuda_top_p._build(9, 0) == path  # the second call finds the build
    lib = cuda_top_p._load(path)
    for rows, chunks in [(1, 1), (32, 32), (7, 3), (512, 256)]:
        assert lib.loraplex_top_p_workspace_size(rows, chunks) == cuda_top_p.workspace_size(rows, chunks)


def test_cpu_tensors_never_take_the_cuda_kernels(monkeypatch):
    assert not cuda_top_p.available(torch.device("cpu"))
    monkeypatch.setenv("LORAPLEX_TOP_P_CUDA", "0")
    assert not cuda_top_p.enabled()


def test_the_workspace_views_sit_after_both_halves_of_the_pass_buffers():
    rows, chunks = 3, 5
    work = torch.arange(cuda_top_p.workspace_size(rows, chunks), dtype=torch.int64)
    cut, per_chunk = cuda_top_p._views(work, rows, chunks)
    half = rows * chunks * cuda_top_p.DIGITS + rows * chunks + rows
    assert cut.dtype == torch.int32 and cut.numel() == rows
    assert cut.data_ptr() == work[2 * half:].data_ptr()
    assert per_chunk.tolist() == list(range(2 * half + rows, 2 * half + rows + 2 * rows * chunks))
    assert per_chunk[-1].item() == work[-1].item()  # the workspace ends with the per-chunk statistics
