"""nvcc_library off the GPU: the speed-of-light probes (bench/csrc/nf4_sol.cu) build against the NF4 kernels' shared
device header, so a compile error in either shows here rather than on the GPU machine; the build is cached by a
digest that covers the include directory, and the probes' sink is sized as bench.nf4_sol assumes."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from server import nvcc_library

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def test_the_probes_build_against_the_kernel_header_and_size_their_sink(tmp_path, monkeypatch):
    from bench import nf4_sol

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    include = (nf4_sol.ROOT / "server" / "kernels" / "nf4" / "csrc",)
    path = nvcc_library.build(nf4_sol.SOURCE, "loraplex_nf4_sol", 9, 0, include_dirs=include)
    assert path.is_relative_to(tmp_path) and path.stat().st_size > 0
    assert nvcc_library.build(nf4_sol.SOURCE, "loraplex_nf4_sol", 9, 0, include_dirs=include) == path
    lib = ctypes.CDLL(str(path))
    lib.loraplex_nf4_sol_sink_words.restype = ctypes.c_longlong
    # 8B gate_up (28,672 x 4,096): 1,792 row tiles, 64 quant blocks; 2 warps a block, 4 splits of 16 blocks
    assert lib.loraplex_nf4_sol_sink_words(2, 28672, 4096, 4) == 4 * 896 * 64
    # 3 splits of 64 blocks take 22 each: still 3; 5 row tiles of 4 warps: 2 blocks
    assert lib.loraplex_nf4_sol_sink_words(4, 80, 4096, 3) == 3 * 2 * 128


def test_a_changed_header_builds_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    include = tmp_path / "include"
    include.mkdir()
    (include / "k.cuh").write_text("constexpr int kValue = 1;\n")
    source = tmp_path / "k.cu"
    source.write_text('#include "k.cuh"\nextern "C" int value() { return kValue; }\n')
    first = nvcc_library.build(source, "k", 9, 0, include_dirs=(include,))
    (include / "k.cuh").write_text("constexpr int kValue = 2;\n")
    second = nvcc_library.build(source, "k", 9, 0, include_dirs=(include,))
    assert first != second
    assert ctypes.CDLL(str(first)).value() == 1 and ctypes.CDLL(str(second)).value() == 2


def test_an_advanced_wgmma_descriptor_is_the_descriptor_of_the_advanced_address(tmp_path, monkeypatch):
    """nf4_wgmma builds one shared-memory descriptor before its loop and advances it by each buffer's and k-step's
    byte offset (smem_desc_advance) instead of building each anew: the same 64 bits for every 16-byte-aligned address
    of an SM's 228 KB and every offset the kernel adds (two x buffers of up to 2 x 256 x 128 bytes, 4 k-steps)."""
    lib = _library_of(tmp_path, monkeypatch, "desc", '#include "nf4_wgmma_ops.cuh"\n'
                      'extern "C" long long desc_mismatches() {\n'
                      '  long long bad = 0, checked = 0;\n'
                      '  const unsigned bms[] = {32, 64, 128, 256};\n'
                      '  for (unsigned addr = 0; addr < 228u * 1024u; addr += 16)\n'
                      '    for (unsigned bm : bms)\n'
                      '      for (unsigned kb = 0; kb < 2; ++kb)\n'
                      '        for (unsigned buffer = 0; buffer < 2; ++buffer)\n'
                      '          for (unsigned j = 0; j < 4; ++j) {\n'
                      '            const unsigned bytes = buffer * 2 * bm * 128 + kb * bm * 128 + 32 * j;\n'
                      '            if (addr + bytes >= 228u * 1024u) continue;\n'
                      '            ++checked;\n'
                      '            const unsigned long long a = smem_desc_advance(smem_desc_sw128(addr), bytes);\n'
                      '            if (a != smem_desc_sw128(addr + bytes)) ++bad;\n'
                      '          }\n'
                      '  return checked > 0 ? bad : -1;\n'
                      '}\n')
    lib.desc_mismatches.restype = ctypes.c_longlong
    assert lib.desc_mismatches() == 0


def test_the_wgmma_probes_build_for_sm90a_against_the_kernel_header(tmp_path, monkeypatch):
    """bench/csrc/wgmma_sol.cu instantiates the server's nf4_wgmma_kernel with parts of its stage left out: a change
    to that kernel that breaks a probe shows here, and the feature suffix names an sm_90a build apart."""
    from bench import wgmma_sol

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    include = (wgmma_sol.ROOT / "server" / "kernels" / "nf4" / "csrc",)
    path = nvcc_library.build(wgmma_sol.SOURCE, "loraplex_wgmma_sol", 9, 0, include_dirs=include, feature="a",
                              flags=("--use_fast_math",))
    assert path.parent.name.endswith("_sm90a") and path.stat().st_size > 0
    assert callable(ctypes.CDLL(str(path)).loraplex_wgmma_sol)


def test_the_resident_ring_probe_builds_for_sm90a_against_the_kernel_header(tmp_path, monkeypatch):
    """bench/csrc/resident_ring.cu instantiates the server's nf4_wgmma_resident_kernel with its RING probe (bulk copies
    beside the walk): a change to that kernel that breaks the probe shows here."""
    from bench import resident_ring

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = ctypes.CDLL(str(resident_ring.build()))
    assert callable(lib.loraplex_resident_ring) and callable(lib.loraplex_resident_ring_source)


def test_the_resident_kernels_shared_memory_and_descriptors(tmp_path, monkeypatch):
    """nf4_wgmma_resident.cuh's layout as the host sizes it: cuda_nf4_wgmma.resident_max_blocks quant blocks of x fit
    the block's dynamic shared memory (resident_smem_bytes within kResidentSmemMax), one more does not, at every block
    token count and with either table; and a descriptor built from its low word (the kernel's walk) is the whole
    descriptor for every 16-byte-aligned address of an SM's 228 KB."""
    from server.kernels.nf4 import cuda_nf4_wgmma

    lib = _library_of(tmp_path, monkeypatch, "resident",
                      '#include "nf4_device.cuh"\n#include "nf4_wgmma.cuh"\n#include "nf4_wgmma_resident.cuh"\n'
                      'extern "C" int smem_bytes(int bm, int blocks, int pairs) {\n'
                      '  return resident_smem_bytes(bm, blocks, pairs != 0);\n'
                      '}\n'
                      'extern "C" int smem_max() { return kResidentSmemMax; }\n'
                      'extern "C" long long lo_mismatches() {\n'
                      '  long long bad = 0;\n'
                      '  for (unsigned addr = 0; addr < 228u * 1024u; addr += 16)\n'
                      '    if (smem_desc_from_lo(smem_desc_sw128_lo(addr)) != smem_desc_sw128(addr)) ++bad;\n'
                      '  return bad;\n'
                      '}\n')
    lib.lo_mismatches.restype = ctypes.c_longlong
    assert lib.lo_mismatches() == 0
    for block_tokens in cuda_nf4_wgmma.RESIDENT_BLOCK_TOKENS:
        for pairs in (False, True):
            most = cuda_nf4_wgmma.resident_max_blocks(block_tokens, pairs)
            assert lib.smem_bytes(block_tokens, most, pairs) <= lib.smem_max() < lib.smem_bytes(
                block_tokens, most + 1, pairs), (block_tokens, pairs)


def test_x_images_are_the_tiles_each_thread_would_have_stored(tmp_path, monkeypatch):
    """nf4_wgmma(bulk_x=True) brings x's tiles as images written once (nf4_wgmma_bulk.cuh, x_image_kernel): each
    16-byte chunk's words must land where store_x_chunk puts them, as test_nf4_wgmma_mapping's emulation of the
    threads' stores (whose tensor-core reads it checks against x @ W^T) places them, for every row of a 128-token
    tile; a wrong permutation or swizzle fails here."""
    from tests.unit.test_nf4_wgmma_mapping import _store_x

    lib = _library_of(tmp_path, monkeypatch, "x_image",
                      '#include "nf4_device.cuh"\n#include "nf4_wgmma_bulk.cuh"\n'
                      'extern "C" int word(int r, int c, int w) { return x_image_word(r, c, w); }\n')
    tokens, blk = 128, 1
    x = torch.randn(tokens, 128).to(torch.bfloat16)
    images = {}
    for r in range(tokens):
        for c in range(8):
            for w in range(4):
                at = r * 32 + lib.word(r, c, w)
                assert 0 <= lib.word(r, c, w) < 32 and at not in images
                images[at] = x[r, 64 * blk + 8 * c + 2 * w:64 * blk + 8 * c + 2 * w + 2]
    stored = _store_x(x, blk, tokens)
    assert images.keys() == stored.keys()
    assert all(torch.equal(images[at], stored[at]) for at in stored)


def _library_of(tmp_path, monkeypatch, name: str, source_text: str) -> ctypes.CDLL:
    """`source_text` built by nvcc_library against server/kernels/nf4/csrc (sm_90, no feature suffix) and loaded."""
    from pathlib import Path

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    csrc = Path(__file__).resolve().parents[2] / "server" / "kernels" / "nf4" / "csrc"
    source = tmp_path / f"{name}.cu"
    source.write_text(source_text)
    return ctypes.CDLL(str(nvcc_library.build(source, name, 9, 0, include_dirs=(csrc,))))
