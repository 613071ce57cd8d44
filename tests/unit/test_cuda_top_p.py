"""The CUDA top-p library off the GPU: csrc/top_p.cu builds with nvcc where there is one (so a compile error shows
here rather than on the GPU machine) and exports what cuda_top_p calls; CPU tensors never take it."""

from __future__ import annotations

import shutil

import pytest
import torch

from server.engine import cuda_top_p


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_library_builds_once_and_exports_its_launchers(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cuda_top_p._build(9, 0)
    assert path.is_relative_to(tmp_path) and path.stat().st_size > 0
    assert cuda_top_p._build(9, 0) == path  # the second call finds the build
    lib = cuda_top_p._load(path)  # loading needs no GPU: the CUDA runtime is linked in and starts at the first call
    for name in ("loraplex_top_p_histogram_pass", "loraplex_top_p_cut_stats", "loraplex_top_p_draw"):
        assert getattr(lib, name).argtypes


def test_cpu_tensors_never_take_the_cuda_kernels(monkeypatch):
    assert not cuda_top_p.available(torch.device("cpu"))
    monkeypatch.setenv("LORAPLEX_TOP_P_CUDA", "0")
    assert not cuda_top_p.enabled()
