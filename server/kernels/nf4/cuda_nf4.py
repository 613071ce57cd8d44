"""NF4 matmul on tensor cores, a CUDA extension compiled on first use (csrc/nf4_mma.cu, nf4_wide.cu and
nf4_wgmma.cu: translation units that build in parallel).

Semantics: as ``nf4_ops.nf4_matmul_reference`` (fp32 dequantize, one rounding to x.dtype, fp32
accumulate). Two kernels share one MMA mapping: ``nf4_mma`` reads bitsandbytes' codes as stored;
``nf4_tile`` streams the forward-only tile layout (``nf4_layout.tile_pack``), which NF4Linear keeps
beside the codes and rebuilds in place whenever they change (1-64 rows); ``nf4_wide`` reads the same layout
with x staged once a block in shared memory (any number of rows). The same layout's kernels in their own modules:
the one-to-sixteen-row ones (``nf4_gemv``, ``nf4_gemv_pairs``) in cuda_nf4_gemv, ``nf4_wgmma`` (Hopper's
warpgroup MMA) in cuda_nf4_wgmma.
Needs nvcc and an sm_80+ GPU;
``is_available()`` says whether it built. The CPU never imports torch's extension builder.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from pathlib import Path

import torch

from server.kernels import pdl as pdl_launch
from server.kernels.nf4.nf4_layout import NF4_BLOCKSIZE, codes_as_bytes
from server.kernels.split_sums import SplitSums

log = logging.getLogger(__name__)
MAX_ROWS = 64
@functools.cache
def extension():
    """Build (or load from torch's extension cache) the kernel for the current GPU's architecture."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    csrc = Path(__file__).parent / "csrc"
    # torch's build cache hashes the listed sources only, not the headers they include: name the build
    # by a digest of every file in csrc so that a changed header rebuilds.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(csrc.iterdir()) if p.is_file())).hexdigest()
    # Hopper builds this extension for sm_90a, whose warpgroup MMA the nf4_wgmma kernels need (the rest run the same
    # there), whatever the environment's arch list says for other builds.
    arch = "9.0a" if (major, minor) == (9, 0) else os.environ["TORCH_CUDA_ARCH_LIST"]
    saved, os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["TORCH_CUDA_ARCH_LIST"], arch
    try:
        # every translation unit (nf4_mma.cu with the bindings, nf4_wide.cu, nf4_wgmma.cu): ninja builds them at once
        sources = [str(path) for path in sorted(csrc.glob("*.cu"))]
        module = load(name=f"loraplex_nf4_mma_{digest[:10]}", sources=sources,
                      extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
        # every NF4 launch programmatically dependent on the kernel ahead, or none (server.kernels.pdl)
        module.set_programmatic_launch(pdl_launch.on(torch.device("cuda", torch.cuda.current_device())))
        return module
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def is_available() -> bool:
    """True when the extension builds and the GPU has bf16 tensor cores (sm_80+)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        extension()
    except Exception:  # a missing nvcc or a failed build: the Triton kernels serve instead
        log.exception("the CUDA NF4 kernel did not build; falling back to Triton")
        return False
    return True


def _rows_bucket(num_rows: int) -> int:
    return 8 if num_rows <= 8 else 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64


@functools.cache
def blocks_per_sm(num_rows_bucket: int, warps: int, rows_per_warp: int = 0) -> int:
    """Resident blocks per SM of the kernel instance for this row bucket (8, 16, 32, 64) and warps;
    rows_per_warp 0: nf4_mma, 1 or 2: nf4_tile with that many 16-row tiles a warp."""
    if rows_per_warp:
        return max(1, extension().nf4_tile_blocks_per_sm(num_rows_bucket, warps, rows_per_warp))
    return max(1, extension().nf4_mma_blocks_per_sm(num_rows_bucket, warps))


def pick_split_k(num_rows: int, out_features: int, in_features: int, num_sms: int, warps: int = 4,
                 resident_blocks: int | None = None, rows_per_warp: int = 0) -> int:
    """The smallest split of K whose grid fills its last wave to >= 90% (ncu at 1 row, 8B gate_up: 1.36
    waves, "up to 50%" lost to the partial one), else the best-filling one; splits keep the fp32 partials
    (written, then read back) under the code bytes and at least 4 quant blocks each. At 64 rows a cap of
    1/4 of the code bytes allowed 2 splits and twice that measured faster on qkv, o and gate_up."""
    row_tiles = -(-out_features // 16)
    num_blocks = in_features // NF4_BLOCKSIZE
    cap = max(1, min(16, in_features // (16 * num_rows), num_blocks // 4))
    if resident_blocks is None:
        resident_blocks = blocks_per_sm(_rows_bucket(num_rows), warps, rows_per_warp)
    slots = resident_blocks * num_sms  # blocks that run at once
    best, best_fill = 1, -1.0
    split_k = 1
    while split_k <= cap:
        ctas = -(-row_tiles // (warps * max(1, rows_per_warp))) * split_k
        waves = ctas / slots
        fill = waves / math.ceil(waves) if waves >= 1 else waves  # under one wave: idle SMs
        if fill >= 0.9:
            return split_k
        if fill > best_fill + 0.02:
            best, best_fill = split_k, fill
        split_k *= 2
    return best


def nf4_mma(
    x: torch.Tensor,  # [T, in] bf16 / fp16, T <= 64
    codes: torch.Tensor,  # [out * in / 2, 1] uint8
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    split_k: int | None = None,
    warps: int = 4,
    num_sms: int = 132,
) -> torch.Tensor:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype."""
    out_features, in_features = shape
    x = x.contiguous()
    out = torch.empty(x.shape[0], out_features, device=x.device, dtype=x.dtype)
    if split_k is None:
        split_k = pick_split_k(x.shape[0], out_features, in_features, num_sms, warps)
    extension().nf4_mma(x, codes_as_bytes(codes), absmax_f, code_table, bias, out, split_k, warps)
    return out


def tile_config(num_rows: int) -> tuple[int, int]:
    """(warps a block, 16-row tiles a warp) of nf4_tile for this many rows: two warps up to 8 rows, four
    above; one tile a warp. H200, 8B shapes (bench/results/2026-12-01-nvidia-h200-kernels-tile-sweep.json):
    two tiles a warp (each x fragment serving 32 weight rows) needs 146-181 registers and lost at 16-32
    rows (qkv at 32 rows: 23.0 µs against 19.8), so the instances with two stay only for the sweep."""
    return (2, 1) if num_rows <= 8 else (4, 1)


def nf4_tile(
    x: torch.Tensor,  # [T, in] bf16 / fp16, T <= 64
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    split_k: int | None = None,
    warps: int | None = None,
    rows_per_warp: int | None = None,
    num_sms: int = 132,
    pdl: bool | None = None,  # programmatically dependent (server.kernels.pdl); None: the process's setting
    defer_sum: bool = False,
) -> torch.Tensor | SplitSums:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype, from the tile layout; with `defer_sum`, when K is split,
    the unsummed partials (split_sums.SplitSums) instead."""
    out_features, in_features = shape
    x = x.contiguous()
    out = torch.empty(x.shape[0], out_features, device=x.device, dtype=x.dtype)
    default_warps, default_rows = tile_config(x.shape[0])
    warps, rows_per_warp = warps or default_warps, rows_per_warp or default_rows
    if x.shape[0] > 8:
        warps = 4  # the instances built (csrc/nf4_mma.cu, dispatch_tile)
    if x.shape[0] <= 8 or x.shape[0] > 32:
        rows_per_warp = 1
    if split_k is None:
        split_k = pick_split_k(x.shape[0], out_features, in_features, num_sms, warps, rows_per_warp=rows_per_warp)
    pdl = pdl_launch.on(x.device) if pdl is None else pdl and pdl_launch.supported(x.device)
    partials = extension().nf4_tile(x, tiled[0], tiled[1], code_table, bias, out, split_k, warps, rows_per_warp, pdl,
                                     defer_sum)
    return out if partials is None else SplitSums(partials, bias, x.dtype)


@functools.cache
def wide_blocks_per_sm(token_tiles: int, rows_per_warp: int) -> int:
    """Resident blocks per SM of the wide kernel instance (token tiles 2, 4, 8 or 16; rows_per_warp 1 or 2)."""
    return max(1, extension().nf4_wide_blocks_per_sm(token_tiles, rows_per_warp))


WIDE_WARPS = 4  # csrc/nf4_wide.cu, WIDE_WARPS


def wide_config(num_rows: int) -> tuple[int, int]:
    """(token tiles of 8 a pass, 16-row tiles a warp) of nf4_wide for this many rows: the narrowest pass of 16, 32,
    64 or 128 rows that holds them (passes of 128 beyond); one tile a warp (two took 181 registers at 8 token
    tiles and 255, spilling, at 16, and lost at 128 rows on all but gate_up)."""
    tiles = 2 if num_rows <= 16 else 4 if num_rows <= 32 else 8 if num_rows <= 64 else 16
    return tiles, 1


def wide_split_k(num_rows: int, shape, num_sms: int, token_tiles: int, rows_per_warp: int) -> int:
    """pick_split_k for the wide kernel: one pass of 8 * token_tiles rows, each group of grid z a full grid."""
    groups = -(-num_rows // (8 * token_tiles))
    resident = max(1, wide_blocks_per_sm(token_tiles, rows_per_warp) // groups)
    return pick_split_k(min(num_rows, 8 * token_tiles), shape[0], shape[1], num_sms, WIDE_WARPS,
                        resident_blocks=resident, rows_per_warp=rows_per_warp)


def nf4_wide(
    x: torch.Tensor,  # [T, in] bf16 / fp16, any T
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    split_k: int | None = None,
    token_tiles: int | None = None,
    rows_per_warp: int | None = None,
    num_sms: int = 132,
    defer_sum: bool = False,
) -> torch.Tensor | SplitSums:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype, from the tile layout, x staged in shared memory once a
    block for all its warps (csrc/nf4_wide.cu, nf4_wide_kernel); same MMA mapping and order of sums as nf4_tile.
    With `defer_sum`, when K is split, the unsummed partials (split_sums.SplitSums) instead."""
    out_features = shape[0]
    x = x.contiguous()
    out = torch.empty(x.shape[0], out_features, device=x.device, dtype=x.dtype)
    default_tiles, default_rows = wide_config(x.shape[0])
    token_tiles, rows_per_warp = token_tiles or default_tiles, rows_per_warp or default_rows
    if split_k is None:
        split_k = wide_split_k(x.shape[0], shape, num_sms, token_tiles, rows_per_warp)
    partials = extension().nf4_wide(x, tiled[0], tiled[1], code_table, bias, out, split_k, token_tiles,
                                     rows_per_warp, defer_sum)
    return out if partials is None else SplitSums(partials, bias, x.dtype)


# A block's tile of nf4_gemm (csrc/nf4_mma.cu: 2 x 2 warps of 64 tokens x 32 weight rows)
GEMM_BLOCK_TOKENS, GEMM_BLOCK_WEIGHT_ROWS = 128, 64
GEMM_RESIDENT_BLOCKS = 2  # ptxas (sm_90, CUDA 13): 215 registers a thread, no spills; 128 threads a block


def gemm_split_k(num_rows: int, shape, num_sms: int) -> int:
    """Splits of K for nf4_gemm: doubled while the grid is under about one wave of resident blocks, each split keeping
    at least 4 quant blocks."""
    out_features, in_features = shape
    blocks = -(-out_features // GEMM_BLOCK_WEIGHT_ROWS) * -(-num_rows // GEMM_BLOCK_TOKENS)
    split_k, cap = 1, max(1, in_features // NF4_BLOCKSIZE // 4)
    while blocks * split_k * 2 <= GEMM_RESIDENT_BLOCKS * num_sms and split_k * 2 <= cap:
        split_k *= 2
    return split_k


def nf4_gemm(
    x: torch.Tensor,  # [T, in] bf16 / fp16, any T
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    split_k: int | None = None,
    num_sms: int = 132,
    defer_sum: bool = False,
) -> torch.Tensor | SplitSums:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype, from the tile layout, x as the MMA's A operand
    (csrc/nf4_gemm.cuh, nf4_gemm_kernel); with `defer_sum`, when K is split, the unsummed partials
    (split_sums.SplitSums) instead."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    if split_k is None:
        split_k = gemm_split_k(x.shape[0], shape, num_sms)
    partials = extension().nf4_gemm(x, tiled[0], tiled[1], code_table, bias, out, split_k, defer_sum)
    return out if partials is None else SplitSums(partials, bias, x.dtype)


# One wait for global loads a step or stage (csrc: nf4_gemv_pairs_kernel and nf4_wgmma_kernel's ONE_WAIT): ptxas gave
# all of a step's global loads one scoreboard, so a read of x waited for the code refill from DRAM; this reads the
# step's loads first and issues the next step's after. The same bits either way. H200, 2026-12-06
# (bench/results/2026-12-06-nvidia-h200-kernels-s38-onewait.json, µs, one wait against the scoreboard ptxas chose):
# gemv_pairs at 1 / 8 rows 8B gate_up 32.0 / 36.0 vs 33.7 / 37.0, down 16.0 / 17.9 vs 17.6 / 19.7, o 7.4 / 7.8 vs
# 9.1 / 9.8 (now ahead of nf4_gemv's 7.7 / 8.3: nf4_dispatch.PAIRS_MIN_WEIGHTS), 1B gate_up 11.0 / 11.9 vs 12.7 /
# 13.7; wgmma's 64-token blocks (64-128 rows) 2-4% faster on every 8B layer (down at 128 rows 56.9 vs 59.3, gate_up at
# 64 61.4 vs 63.2), its 32-token ones even (8B gate_up at 32 rows 49.3 vs 48.7) and its 128-token one slower (8B
# gate_up at 128 rows 112.7 vs 107.6). The same for gemv_pairs' two token tiles (9-16 rows; x loaded in the step,
# the refill after the MMAs read it) was mixed and removed (H100, -2026-12-06-nvidia-h100-80gb-hbm3-kernels-s38.json,
# the design in 48198a4: 8B gate_up at 16 rows 51.4 vs 49.5 µs, down 24.6 vs 25.0). LORAPLEX_NF4_ONE_WAIT: auto
# (those measured wins, the default), 1 (wherever a kernel has it: gemv_pairs at 1-8 rows, wgmma blocks of two
# warpgroups and one quant block a stage up to 128 tokens), 0 (never).
ONE_WAIT = os.environ.get("LORAPLEX_NF4_ONE_WAIT", "auto")


def one_wait_for(block_tokens: int) -> bool:
    """Whether a step of nf4_gemv_pairs (block_tokens 8: 1-8 rows) or of a wgmma block of `block_tokens` tokens (two
    warpgroups, one quant block a stage) waits once for its global loads by default (ONE_WAIT)."""
    if ONE_WAIT in ("0", "1"):
        return ONE_WAIT == "1" and block_tokens <= 128
    return block_tokens in (8, 64)
