"""nf4_wgmma: the NF4 matmul on Hopper's warpgroup MMA (csrc/nf4_wgmma.cuh, built into cuda_nf4's extension), with
the block, split and occupancy choices the dispatch gives it at 17-256 rows. The tile layout's fragments, as the
other kernels in cuda_nf4, dequantized into registers as the wgmma's A; x from shared memory as its B."""

from __future__ import annotations

import functools

import torch

from server.kernels.nf4.cuda_nf4 import extension, is_available, one_wait_for
from server.kernels.nf4.nf4_layout import NF4_BLOCKSIZE
from server.kernels.split_sums import SplitSums


@functools.cache
def wgmma_supported() -> bool:
    """The extension's code for this GPU has the warpgroup-MMA kernels (an sm_90a build: H100, H200)."""
    return is_available() and bool(extension().nf4_wgmma_built())


WGMMA_BLOCK_TOKENS = (32, 64, 128, 256)  # nf4_wgmma's instances (csrc/nf4_wgmma.cu, dispatch_wgmma)
WGMMA_MAX_SPLIT_K = 16  # the Triton consumers of deferred partials sum at most 16 (triton_glue.MAX_SPLITS)
WGMMA_BLOCK_WARPS = 8  # csrc/nf4_wgmma.cuh's default block: two warpgroups of 64 weight rows each
# nf4_wgmma(bulk_x=True)'s instances, (block tokens, block warps) -> blocks an SM (csrc nf4_wgmma.cu, bulk_x_for; ptxas
# sm_90a: 127 registers a thread at 128 tokens, 80 at 64)
BULK_X_BLOCKS = {(128, 8): 2, (128, 16): 1, (64, 8): 3}
CLUSTER_MAX_SPLITS = 8  # nf4_wgmma(bulk_x=True, cluster_sum=True): the splits a portable cluster holds


def cluster_split_k(wave_split_k: int) -> int:
    """The splits of K for cluster_sum's default: the largest power of two up to the wave's split and
    CLUSTER_MAX_SPLITS. Why a power of two: the H100's first timing (forty-ninth session,
    bench/results/2026-12-07-nvidia-h100-80gb-hbm3-kernels-s49-cluster.json) had 5- to 8-block clusters at 1.8-2.5x
    the unclustered kernel (8B qkv, o, down at 96-128 rows) and 2-block ones 18% faster (1B gate_up); a GPC's SMs hold
    a whole number of clusters, and 5 or 7 leave slots empty. With every block summing a share (the second form,
    -kernels-s49-cluster-shares.json): 8B qkv at 128 rows 28.0 us at 4 splits against 25.1 unclustered at 5, o 37.1
    at 8 against 19.3; 1B gate_up 24.4 against 30.2 for the rules' pick, 8B qkv at 256 39.8 against 46.4. So a
    tuning candidate, not the rules' pick: clusters of 4-8 still take about twice the kernel (not the sum: the
    shares cut its reads 8-fold and moved 8B o by a fifth), clusters of 2 win. Why (H100,
    nf4_wgmma_cluster_occupancy, -cluster-occupancy-s49.txt): 30 clusters of 8 fit at once (240 blocks of the 264
    slots), so 8B o's and down's 32 row groups at 128 rows run in two waves; 62 of 4 and 132 of 2 fit (248, 264)."""
    return 1 << (min(wave_split_k, CLUSTER_MAX_SPLITS).bit_length() - 1)


def wgmma_row_groups(out_features: int, block_warps: int = WGMMA_BLOCK_WARPS) -> int:
    """Blocks of nf4_wgmma along the weight's rows (grid x): 16 rows a warp."""
    return -(-out_features // (16 * block_warps))


def wgmma_block_tokens(num_rows: int, shape, num_sms: int) -> int:
    """Tokens a block of nf4_wgmma: the smallest instance that holds every row (each weight dequantized once), 256
    beyond (blocks along grid z); but at 65-128 rows the 64-token instance (two blocks an SM, each weight
    dequantized twice) where the weight's 128-row groups are fewer than the SMs: the 128-token instance (167
    registers) runs one block an SM, too few warps to hide its loads. H200 at 128 rows
    (bench/results/2026-12-04-nvidia-h200-kernels-s24-wgmma.json, us, 64 against 128 tokens): 1B gate_up 32.1 vs
    47.1, 1B down 20.6 vs 22.4, 8B o 22.3 vs 23.8, 8B down 58.2 vs 57.4; 8B gate_up (224 groups) 122.6 vs 108.4."""
    tokens = next((b for b in WGMMA_BLOCK_TOKENS if num_rows <= b), WGMMA_BLOCK_TOKENS[-1])
    if tokens == 128 and wgmma_row_groups(shape[0]) < num_sms:
        return 64
    return tokens


def wgmma_split_k(num_rows: int, shape, num_sms: int, block_tokens: int, occupancy: int = 2,
                  block_warps: int = WGMMA_BLOCK_WARPS) -> int:
    """Splits of K for nf4_wgmma: as many as keep the grid within one wave of `occupancy` blocks an SM (not only
    powers of two: 8B qkv's 48 row groups at 32 rows take 5 splits, 240 blocks, where doubling stopped at 4, 192 of
    264), each split keeping at least 4 quant blocks, at most 16 splits (the Triton consumers of deferred partials
    sum 16). The instances built for 24 warps an SM (three blocks of two warpgroups, or six of one) keep 8 quant
    blocks a split, or the default instance's split count: with ~5 a split the three-block one lost (H200, 32 rows,
    bench/results/2026-12-04-nvidia-h200-kernels-s25-variants.json, us, against two an SM: 8B o 11.7 vs 11.1 at 12
    splits, 1B down 12.3 vs 10.9 at 24), with 8+ it won (8B qkv 14.3 vs 15.4 at 8, down 25.5 vs 26.4 at 12, gate_up
    50.0 vs 52.3 and 1B gate_up 18.9 vs 19.9 at 1 and 3; 1B qkv 7.6 vs 7.8 at the same 8). Past one wave loses even
    where the wave is uneven: 8B gate_up at 32 rows runs 224 blocks on 132 SMs (92 SMs two, 40 one; ncu: barrier
    stalls first), yet 2, 3 and 4 splits took 55.5, 52.8 and 50.4 us against one split's 47.7 (H100,
    bench/results/2026-12-05-nvidia-h100-80gb-hbm3-kernels-s35-splits.json). bulk_x at 128 rows likewise: 2-4 splits
    against the wave's 5 (8B qkv) and 8 (o, down) lost everywhere, so the fp32 partials' traffic is not what holds
    it (H100, us: qkv 26.7 at 4 against 24.8, o 23.2 at 3 against 18.4, down 63.3 at 4 against 39.5;
    -kernels-s49-splits.json, bench.kernels' wgmma_bx_k2-k4 then)."""
    out_features, in_features = shape
    in_blocks = in_features // NF4_BLOCKSIZE
    blocks = wgmma_row_groups(out_features, block_warps) * -(-num_rows // block_tokens)
    splits = max(1, min(WGMMA_MAX_SPLIT_K, in_blocks // 4, occupancy * num_sms // blocks))
    if occupancy * block_warps == 24:
        splits = max(min(splits, in_blocks // 8), wgmma_split_k(num_rows, shape, num_sms, block_tokens))
    return splits


RESIDENT_WARPGROUPS = (4, 5, 6, 7)  # the x-resident kernel's instances (dispatch_wgmma)
# and its x tiles: 16 tokens (m64n16 wgmmas) at up to 16 rows, 32 beyond. Tiles of 64 (4 warpgroups) and 128 (2-3)
# tokens lost to nf4_wgmma_kernel at 33-128 rows and were removed (H100, 8B, us, best resident against the default:
# gate_up 75.97 vs 58.64 at 64 rows, 138.68 vs 105.04 at 128; down 30.70 vs 31.29 and 72.40 vs 55.64;
# bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s42-tiles.json)
RESIDENT_BLOCK_TOKENS = (16, 32)
_RESIDENT_SMEM = 226 * 1024  # csrc nf4_wgmma_resident.cuh: kResidentSmemMax
_PAIRS_BELOW, _PAIRS_PAST = 0x10000 - 1024, 130048  # its window below the pair table; resident_smem_bytes' base


def resident_max_blocks(block_tokens: int, pairs: bool = False) -> int:
    """The most quant blocks of x a split may hold in the x-resident kernel (csrc resident_smem_bytes within
    kResidentSmemMax): 56 at 32 block tokens (4 KB a block), 39 beside the 64 KB byte-pair table."""
    tile = block_tokens * 128
    if not pairs:
        return (_RESIDENT_SMEM - 2048) // tile
    return _PAIRS_BELOW // tile + (_RESIDENT_SMEM - _PAIRS_PAST) // tile


RESIDENT_PARTIAL_BYTES_A_STAGE = 2.4e6  # fp32 partials written and read back in one quant block's stage (~0.8 us)


def resident_split_k(num_rows: int, shape, num_sms: int, warpgroups: int, pairs: bool = False,
                     block_tokens: int = 32) -> int:
    """Splits of K for the x-resident kernel (nf4_wgmma(resident_warpgroups=...)): of those whose x fits an SM's
    shared memory, the fewest that make its cost in stages least: the warpgroups' longest walk (rounds of 64-row units
    x the split's quant blocks; one block an SM, num_sms // (splits x token groups) blocks a split) plus the fp32
    partials a split writes and the sum reads back, in stages (RESIDENT_PARTIAL_BYTES_A_STAGE); with `pairs`, x beside
    the byte-pair table (resident_max_blocks). 8B gate_up (448 units, 64 quant blocks) at 32 rows takes 2 splits: 66
    blocks of 7 warpgroups, one round of 32 blocks, + 6 stages of partials. The cost model is a guess; start-up
    tuning times the warpgroup counts it splits for."""
    units, in_blocks = -(-shape[0] // 64), shape[1] // NF4_BLOCKSIZE
    token_groups = -(-num_rows // block_tokens)
    most = resident_max_blocks(block_tokens, pairs)
    best = None
    for splits in range(1, min(WGMMA_MAX_SPLIT_K, in_blocks) + 1):
        per_split = -(-in_blocks // splits)
        if per_split > most:
            continue
        blocks = max(1, min(-(-units // warpgroups), num_sms // (splits * token_groups)))
        walk = -(-units // (blocks * warpgroups)) * per_split
        partials = 0 if splits == 1 else splits * num_rows * shape[0] * 8 / RESIDENT_PARTIAL_BYTES_A_STAGE
        if best is None or walk + partials < best[0]:
            best = (walk + partials, splits)
    return best[1]


def wgmma_occupancy(block_tokens: int, block_warps: int = WGMMA_BLOCK_WARPS) -> int:
    """Blocks an SM nf4_wgmma's instance is built for: 3 for 32 tokens (80 registers: 24 warps an SM to hide the
    loads and the waits; the measurements at wgmma_split_k), else 2 (the 128- and 256-token instances run one);
    with one warpgroup a block (block_warps 4): 6 at 32 tokens, 4 at 64, 3 at 128."""
    if block_warps != WGMMA_BLOCK_WARPS and block_tokens == 128:
        return 3  # 167 registers: three one-warpgroup blocks fit where one of two warpgroups does
    blocks = 3 if block_tokens == 32 else 2
    return blocks * WGMMA_BLOCK_WARPS // block_warps


def nf4_wgmma(
    x: torch.Tensor,  # [T, in] bf16 / fp16, any T
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None = None,  # [out]
    split_k: int | None = None,
    block_tokens: int | None = None,
    num_sms: int = 132,
    defer_sum: bool = False,
    stage_blocks: int = 1,
    occupancy: int | None = None,
    block_warps: int = WGMMA_BLOCK_WARPS,
    one_wait: bool | None = None,
    resident_warpgroups: int = 0,
    pairs: bool = False,
    bulk_x: bool = False,
    cluster_sum: bool = False,
) -> torch.Tensor | SplitSums:
    """y [T, out] = x @ dequant(W)^T (+ bias) in x.dtype, from the tile layout, on Hopper's warpgroup MMA: a warp's 16
    weight rows dequantized into registers as the wgmma's A, x (B) from shared memory (csrc/nf4_wgmma.cuh). Needs
    wgmma_supported(). With `defer_sum`, when K is split, the unsummed partials (split_sums.SplitSums) instead.
    `stage_blocks` 2 (32 block tokens only): two quant blocks a barrier and wgmma wait; `occupancy` 3 (32 block tokens,
    one block a stage; the default there, wgmma_occupancy): the instance built for three blocks an SM, its splits
    filling that wave (2: the instance built for two). `one_wait` (None: one_wait_for(block_tokens) where the block
    allows it: two warpgroups, one block a stage, up to 128 block tokens): one wait for global loads a stage.
    `block_warps` 4 (up to 128 block tokens, one block a stage): one warpgroup (64 weight rows) a block, so twice the
    blocks (wgmma_occupancy). `resident_warpgroups` 4-7 (tuning candidates; 16 or 32 block tokens):
    the x-resident kernel (csrc/nf4_wgmma_resident.cuh), one block an SM of that many warpgroups holding x of its split
    of K, each warpgroup walking 64-row units on its own (splits: resident_split_k); with `pairs`, its dequantization
    from the byte-pair table (5 instructions a weight pair where the 16-entry table's take 8), 64 KB beside x.
    `bulk_x` (128 block tokens, or 64 in 8 warps, three blocks an SM at 80 registers; the rules' pick past 64 rows,
    nf4_dispatch.BULK_X): the default block with x's tiles written once as their shared-memory images and brought a
    stage at a time by the TMA unit (csrc/nf4_wgmma_bulk.cuh): no thread stages x, 127 registers where the default
    takes 167, so two blocks an SM instead of one; with `block_warps` 16, four warpgroups (256 weight rows) share
    each tile, one block an SM: half the x a weight row reads from the L2 (slower than 8 warps at every measured
    shape, by 6-20%); with `cluster_sum` (default splits: cluster_split_k; at most CLUSTER_MAX_SPLITS) a row and token
    group's splits are one thread-block cluster whose blocks each sum a share of the tile through distributed shared
    memory in split order, instead of fp32 partials and a second kernel (the same bits; nothing to defer). Each
    warpgroup issues the same wgmmas in the same order whatever the variant: the same bits for the same splits. Measured
    slower and removed (H200, 32-256 rows): dequantizing the next quant block while this one's wgmmas run (3-15%,
    bench/results/2026-12-04-nvidia-h200-kernels-s25-o3.json, wgmma_ov) and a code ring four blocks deep instead of two
    (3-20%, -kernels-s25-p4.json, wgmma_p4). At 32 rows the kernel issues on 51% of cycles (ncu, 8B gate_up: 13.5 warps
    an SM); about two thirds of a quant-block step's ~255 instructions (PTX) are the exact dequantization (per weight
    pair 2 byte-permutes, 2 table loads, 2 fp32 multiplies, 1 pack). Also measured slower and removed (H100, every size:
    bench/results/2026-12-05-nvidia-h100-80gb-hbm3-kernels-s34-pairs.json): that dequantization from the byte-pair table
    (wgmma_pairs) and A dequantized into shared memory (wgmma_sa). And (H100,
    -2026-12-06-nvidia-h100-80gb-hbm3-kernels-s37-xahead.json, the design in 55afbf5): x two stages ahead in two
    register sets (8B gate_up 50.3 vs 47.9 us at 32 rows, 71.5 vs 60.6 at 64), with the code ring four deep too (52.5),
    and a 16-token block at 16 rows (48.9 vs the 32-token block's 47.4). And a balanced split of K over a full wave
    (stream-K, every block the same share of the row groups' quant blocks, partials summed in slot order; design in
    8819aa9), for 8B gate_up's 224 row groups on 132 SMs: 52.6 vs 47.7 us at 32 rows, 83.9 vs 58.5 at 64, 47.4 vs 48.3
    at 16 (H100, bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s39-sk.json). And each warpgroup staging its own
    copy of x behind a barrier of its own 4 warps instead of the block's 8 (design in 4136b96): slower at every shape,
    8B gate_up 64.0 vs 47.7 us at 32 rows, 76.5 vs 58.6 at 64 (H100,
    -2026-12-06-nvidia-h100-80gb-hbm3-kernels-s40-wx.json). And the codes and scales asked of the L2 4-16 quant blocks
    ahead by the TMA unit's bulk prefetch (lane 0 a warp, a block's 576 bytes a stage; design in d9ec549), for the
    register ring's loads to find them there: slower at every shape, 8B gate_up 55.2-58.4 vs 47.6 us at 32 rows, 66.7 vs
    58.6 at 64; the loads alone no faster (34.3 vs 33.6 us: bench.wgmma_sol's loads_l2), so DRAM latency is not what
    holds them (H100, -kernels-s40-l2.json, -wgmma-sol-s40-l2.json). Nor where in a tile the grid's warps read at once:
    each row group walking its split from its own start and wrapping around (design in 4e564b2) left the loads alone as
    they were (34.2 vs 33.6 us) and slowed every shape (8B gate_up 55.5 vs 48.4 at 32 rows; -kernels-s40-rot.json,
    -wgmma-sol-s40-rot.json). Nor two quant blocks a stage with one wait for both blocks' codes, issued together a stage
    ahead (a warp's loads in flight doubled; design in 96beb99): 8B gate_up 48.2 vs 46.2 us at 32 rows for two blocks a
    stage with two waits (H100, -kernels-s41-s2w.json)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    if cluster_sum and not bulk_x:
        raise ValueError("cluster_sum is bulk_x's: its splits of K summed in a thread-block cluster")
    if bulk_x:  # the 128- or 64-token block with x's tiles brought by the TMA unit (csrc/nf4_wgmma_bulk.cuh)
        block_tokens = block_tokens or 128
        if ((block_tokens, block_warps) not in BULK_X_BLOCKS or stage_blocks != 1 or resident_warpgroups or pairs
                or one_wait or occupancy is not None):  # fmt: skip
            raise ValueError("bulk_x takes 128 block tokens in 8 or 16 warps, or 64 in 8, and one quant block a "
                             "stage, with no other variant")
        if split_k is None:  # one wave of BULK_X_BLOCKS' blocks an SM (the 64-token block's three of 8 warps keep 8
            # quant blocks a split, as the 32-token three-an-SM instance measured best; not yet timed for it)
            split_k = wgmma_split_k(x.shape[0], shape, num_sms, block_tokens, BULK_X_BLOCKS[block_tokens, block_warps],
                                    block_warps)
            if cluster_sum:  # a power of two: 2-way clusters won where 5- and 8-way lost (cluster_split_k)
                split_k = cluster_split_k(split_k)
        if cluster_sum and split_k > CLUSTER_MAX_SPLITS:
            raise ValueError(f"cluster_sum sums at most {CLUSTER_MAX_SPLITS} splits in a cluster, got {split_k}")
        partials = extension().nf4_wgmma_bulk_x(x, tiled[0], tiled[1], code_table, bias, out, split_k, block_tokens,
                                                 block_warps, cluster_sum, defer_sum)
        return out if partials is None else SplitSums(partials, bias, x.dtype)
    if resident_warpgroups:
        block_tokens = block_tokens or 32
        if block_tokens not in RESIDENT_BLOCK_TOKENS:
            raise ValueError(f"the x-resident kernel takes {RESIDENT_BLOCK_TOKENS} block tokens, got {block_tokens}")
        if split_k is None:
            split_k = resident_split_k(x.shape[0], shape, num_sms, resident_warpgroups, pairs, block_tokens)
    block_tokens = block_tokens or wgmma_block_tokens(x.shape[0], shape, num_sms)
    if occupancy is None:
        occupancy = wgmma_occupancy(block_tokens, block_warps) if stage_blocks == 1 else 2
    if split_k is None:
        split_k = wgmma_split_k(x.shape[0], shape, num_sms, block_tokens, occupancy, block_warps)
    blocks_per_sm = 3 if occupancy == 3 and block_warps == WGMMA_BLOCK_WARPS else 0
    if one_wait is None:  # where the block allows it: two warpgroups, one block a stage, 32-128 tokens
        one_wait = one_wait_for(block_tokens) and block_warps == WGMMA_BLOCK_WARPS and stage_blocks == 1
    partials = extension().nf4_wgmma(x, tiled[0], tiled[1], code_table, bias, out, split_k, block_tokens, stage_blocks,
                                      blocks_per_sm, block_warps, one_wait, resident_warpgroups, pairs, defer_sum)
    return out if partials is None else SplitSums(partials, bias, x.dtype)
