"""The x-one-step-ahead schedules of the one-to-sixteen-row NF4 kernels, emulated step by step on the CPU: every step
that computes must find its own block's x in the buffer it reads, whatever the split of K, the ring's depth and the
number of row tiles a warp walks (csrc/nf4_pairs.cuh, nf4_gemv_pairs_kernel: two register buffers, step s of a tile
in buffer s % 2, the steps a tile a multiple of the ring's even depth)."""

from __future__ import annotations

import pytest


def pairs_walk(num_blocks: int, group_warps: int, member: int, prefetch: int, tiles: int,
               loaded: list[int] | None = None) -> list[tuple[int, int]]:
    """(block computed, block whose x the read buffer holds) for each computing step of one warp of
    nf4_gemv_pairs_kernel over `tiles` row tiles, mirroring its loops; every block whose x it loads into `loaded`."""
    per_warp = -(-num_blocks // group_warps)
    first = min(member * per_warp, num_blocks)
    last = min(first + per_warp, num_blocks)
    steps = -(-per_warp // prefetch) * prefetch
    buffers = [min(first, num_blocks - 1), None]  # the load before the tile loop
    loaded = [] if loaded is None else loaded
    loaded.append(buffers[0])
    seen = []
    for _ in range(tiles):
        for base in range(0, steps, prefetch):
            for i in range(prefetch):
                blk = first + base + i
                buffers[(i + 1) % 2] = min(blk + 1 if blk + 1 < last else first, num_blocks - 1)
                loaded.append(buffers[(i + 1) % 2])
                if blk < last:
                    seen.append((blk, buffers[i % 2]))
    return seen


@pytest.mark.parametrize("num_blocks, group_warps", [(64, 4), (64, 8), (224, 16), (24, 32), (4, 8), (6, 4), (7, 2)])
@pytest.mark.parametrize("prefetch", [2, 4])
@pytest.mark.parametrize("tiles", [1, 3])
def test_every_pairs_step_reads_its_own_blocks_x(num_blocks, group_warps, prefetch, tiles):
    for member in range(group_warps):
        loaded = []
        seen = pairs_walk(num_blocks, group_warps, member, prefetch, tiles, loaded)
        assert all(blk == held for blk, held in seen)
        assert all(0 <= blk < num_blocks for blk in loaded)  # within x's row, also for a warp with no blocks
        per_warp = -(-num_blocks // group_warps)
        assert len(seen) == tiles * max(0, min(per_warp, num_blocks - member * per_warp))


def gemv_walk(num_blocks: int, warps: int, warp: int, prefetch: int) -> list[tuple[int, int]]:
    """(block computed, block whose x the read buffer holds) for each step of one warp of nf4_gemv_kernel (one tile,
    blocks first..last - 1, the loop leaving at last), mirroring its loops; nf4_tile_kernel's loop at one token
    tile is the same."""
    per_warp = -(-num_blocks // warps)
    first = min(warp * per_warp, num_blocks)
    last = min(first + per_warp, num_blocks)
    seen = []
    if first >= last:
        return seen
    buffers = [first, None]
    for base in range(first, last, prefetch):
        for i in range(prefetch):
            blk = base + i
            if blk >= last:
                break
            buffers[(i + 1) % 2] = min(blk + 1, last - 1)
            seen.append((blk, buffers[i % 2]))
    return seen


@pytest.mark.parametrize("num_blocks, warps", [(64, 8), (64, 16), (224, 16), (7, 4), (3, 8), (24, 2)])
@pytest.mark.parametrize("prefetch", [2, 4])
def test_every_gemv_step_reads_its_own_blocks_x(num_blocks, warps, prefetch):
    for warp in range(warps):
        seen = gemv_walk(num_blocks, warps, warp, prefetch)
        assert all(blk == held for blk, held in seen)
