"""bench.flashinfer_decode off the GPU: FlashInfer's page arrays from loraplex's block tables, and (where its headers
were fetched into .flashinfer/) the probe's sm_90 build against them."""

import ctypes

import pytest
import torch

from bench import flashinfer_decode
from server import nvcc_library


def test_page_arrays_follow_each_rows_used_blocks():
    tables = torch.tensor([[7, 3, 9, 0], [2, 5, 0, 0], [4, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([33, 16, 1], dtype=torch.int32)  # 3 blocks (1 position in the last), 1 full block, 1 position
    arrays = flashinfer_decode.paged_arrays(tables, lens)
    assert arrays["indptr"].tolist() == [0, 3, 4, 5]
    assert arrays["indices"].tolist() == [7, 3, 9, 2, 4]
    assert arrays["last_page_len"].tolist() == [1, 16, 1]
    assert arrays["request_indices"].tolist() == [0, 1, 2] and arrays["kv_tile_indices"].tolist() == [0, 0, 0]
    assert arrays["kv_chunk_size"].tolist() == [33]
    assert all(a.dtype == torch.int32 for a in arrays.values())


def test_the_probe_builds_against_flashinfers_headers(tmp_path, monkeypatch):
    if not (flashinfer_decode.HEADERS / "include" / "flashinfer").is_dir():
        pytest.skip("FlashInfer's headers not fetched (python -m bench.flashinfer_decode --fetch)")
    try:
        nvcc_library.nvcc()
    except (FileNotFoundError, RuntimeError):
        pytest.skip("no nvcc")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = flashinfer_decode.build(9, 0)
    assert callable(ctypes.CDLL(str(path)).loraplex_flashinfer_decode)
