"""The one-to-sixteen-row NF4 kernels of the CUDA extension (csrc/nf4_tile.cuh, csrc/nf4_pairs.cuh) and their
configuration: ``nf4_gemv`` (a block a row tile, K split among its warps and summed in shared memory; 1-8 rows) and
``nf4_gemv_pairs`` (the byte-pair table on a persistent grid; 1-16 rows). The other kernels are in cuda_nf4."""

from __future__ import annotations

import functools

import torch

from server.kernels.nf4 import cuda_nf4
from server.kernels.nf4.cuda_nf4 import extension
from server.kernels.nf4.nf4_layout import NF4_BLOCKSIZE

GEMV_WARPS = (16, 8, 4, 2)  # the instances built (csrc/nf4_mma.cu, nf4_gemv)
GEMV_RESIDENT_WARPS = 32  # a block's launch bounds cap the kernel at 64 registers: 32 warps an SM


@functools.cache
def gemv_warps(shape: tuple[int, int], num_sms: int) -> int | None:
    """Warps a block of nf4_gemv (each a slice of K) for an (out, in) weight: 16 or 8, the most whose blocks (one a
    row tile) run in one wave with at least two quant blocks a warp; None where not even 8 do, and the tile kernel
    serves. H200, 8B shapes at one row (µs, bench/results/2026-12-04-nvidia-h200-kernels-s20-gemv.json): qkv (384
    row tiles) 8 warps 10.8, 16 11.8, tile 12.0; o and down (256) 16 warps 8.7 and 20.4 against tile 9.9 and 21.9;
    gate_up (1,792 row tiles: 2 warps fill one wave) 2 warps 41.0, 4 38.9, 8 39.1 against the tile kernel's 16
    splits 37.8: a weight that tall needs more waves than one block a tile gives."""
    out_features, in_features = shape
    row_tiles, num_blocks = -(-out_features // 16), in_features // NF4_BLOCKSIZE
    for warps in GEMV_WARPS[:2]:
        if row_tiles * warps <= GEMV_RESIDENT_WARPS * num_sms and num_blocks >= 2 * warps:
            return warps
    return None


def nf4_gemv(
    x: torch.Tensor,  # [T, in] bf16 / fp16, T <= 8
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    warps: int | None = None,
    num_sms: int = 132,
) -> torch.Tensor:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype, from the tile layout: a block a row tile, K split among its
    warps and summed in shared memory (csrc/nf4_tile.cuh, nf4_gemv_kernel): one kernel, no fp32 partials. The same
    sums in the same order as nf4_tile with split_k = warps."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    extension().nf4_gemv(x, tiled[0], tiled[1], code_table, bias, out, warps or gemv_warps(tuple(shape), num_sms) or 8)
    return out


GEMV_PAIRS_GROUPS = (4, 8, 16, 32)  # warps a row tile of nf4_gemv_pairs (csrc/nf4_pairs.cuh: blocks of 32 warps)


@functools.cache
def gemv_pairs_group_warps(shape: tuple[int, int], num_sms: int, token_tiles: int = 1) -> int:
    """Warps a row tile of nf4_gemv_pairs for an (out, in) weight, by a model: a step is a quant block a warp, and a
    group of g warps takes ceil(blocks / g) steps a tile (at least 4 for one token tile and 2 for two: fewer leave
    a warp little to overlap with its loads), + 1 for its sum; a round is one tile for each of the 32 / g groups an
    SM holds (one block of 32 warps an SM). The fewest steps over all rounds wins, ties to the more warps a tile. On
    132 SMs, 8B, one token tile: qkv 8 (one round of 8 steps), o and down 16, gate_up 4 (two rounds of 16). H100,
    one row (bench/results/2026-12-05-nvidia-h100-80gb-hbm3-kernels-s34-xnext.json, µs, the model's group against
    the best of 4-32): qkv 11.53 (best), o 8.65 vs 8.62, gate_up 32.90 vs 32.73, down 17.07 (best)."""
    out_features, in_features = shape
    row_tiles, num_blocks = -(-out_features // 16), in_features // NF4_BLOCKSIZE
    best = None
    for group in reversed(GEMV_PAIRS_GROUPS):
        rounds = -(-row_tiles // (num_sms * (GEMV_RESIDENT_WARPS // group)))
        cost = rounds * (max(-(-num_blocks // group), 4 if token_tiles == 1 else 2) + 1)
        if best is None or cost < best[0]:
            best = (cost, group)
    return best[1]


def nf4_gemv_pairs(
    x: torch.Tensor,  # [T, in] bf16 / fp16, T <= 16
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    group_warps: int | None = None,
    num_sms: int = 132,
    one_wait: bool | None = None,
) -> torch.Tensor:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype, from the tile layout, the weights dequantized from a table of
    all 256 byte values (csrc/nf4_device.cuh, a_fragments_pairs: 5 instructions a weight pair against 8) that a
    persistent grid fills once a block (csrc/nf4_pairs.cuh). The same bits as nf4_tile(split_k=group_warps) (and
    nf4_gemv(warps=group_warps) up to 8 rows). 9-16 rows take two token tiles and 192 KB of shared memory a block
    (sm_90); 1-8 rows 128 KB (pairs_supported). The dispatch gives it the large weights' 1-8 row calls
    (nf4_dispatch.PAIRS_MIN_WEIGHTS). `one_wait` (None: cuda_nf4.one_wait_for(8); 1-8 rows only): one wait for
    global loads a step (csrc/nf4_pairs.cuh)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    group_warps = group_warps or gemv_pairs_group_warps(tuple(shape), num_sms, 1 if x.shape[0] <= 8 else 2)
    one_wait = cuda_nf4.one_wait_for(8) and x.shape[0] <= 8 if one_wait is None else one_wait
    extension().nf4_gemv_pairs(x, tiled[0], tiled[1], code_table, bias, out, group_warps, one_wait)
    return out


PAIRS_SMEM_BYTES = 128 * 1024  # nf4_gemv_pairs's shared memory a block at 1-8 rows (csrc/nf4_pairs.cuh)


@functools.cache
def pairs_supported(device_index: int) -> bool:
    """Whether a block on this device may take the 128 KB of shared memory nf4_gemv_pairs asks for at 1-8 rows: A100,
    H100 and H200 give up to 163-227 KB a block, sm_86 / sm_89 cards 99 KB (there the launch would fail)."""
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # a torch without the attribute: the compute capabilities known to give it
        return (props.major, props.minor) in ((8, 0), (9, 0), (10, 0))
    return optin >= PAIRS_SMEM_BYTES
