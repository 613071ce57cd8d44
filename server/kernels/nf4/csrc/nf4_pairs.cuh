// One to sixteen rows (one or two token tiles of 8; batch-1 decode first) over the byte-pair table (nf4_device.cuh,
// a_fragments_pairs_at): 5 instructions a weight pair where the 16-entry table's dequant_pair takes 8. Included by
// nf4_mma.cu after nf4_device.cuh (wait_for_prior_grid, store_output).
//
// The table is 64 KB of shared memory to fill, too much to fill once a row tile as nf4_gemv_kernel's blocks (one a
// tile) would, so the grid is persistent: one block of WARPS (32) warps an SM, filling the table once. It sits at
// offset 64 KB of the block's shared-memory window (pairs_smem_bytes: the warps' sums below it, or after it for two
// token tiles), so a byte permute alone gives a pair's address (load_pair_at). The block's warps form at most 8
// groups (named barriers 1-8) of `group_warps`; group i of block b is worker b * groups + i, and walks row tiles
// worker, worker + workers, ... Each tile's K is split among the group's warps as nf4_tile with split_k = group_warps
// splits it (warp w: quant blocks [w * per_warp, (w + 1) * per_warp)), and their fp32 sums meet in shared memory
// and are added in warp order: the same sums in the same order, so the same bits as nf4_tile (and as nf4_gemv at
// group_warps warps, up to 8 rows).
//
// A warp's code and scale loads run PREFETCH quant blocks ahead in registers along its whole walk, across tiles (the
// next tile's first blocks load while it finishes the current one), so a tile's end costs a group barrier and the
// sum, not a refill of the ring. The walk takes `steps` steps a tile, its share of K rounded up to a multiple of
// PREFETCH, so that step s of every tile sits in ring slot s % PREFETCH (slots are registers: indices must be
// constants); a step past the warp's last block computes nothing.
#pragma once

namespace {

// The code ring's depth, 2 quant blocks: with x one step ahead (one token tile) or two token tiles' x and
// accumulators, 4 deep spills at the 64-register cap (SASS, sm_90a: 40 and 56 bytes). 2 deep is still ~4,000 cycles
// ahead at the measured ~2,000 a warp's step (ncu, H100, 8B gate_up at one row), past any DRAM latency.
constexpr int kPairsPrefetch = 2;
constexpr int kPairsWarps = 32;

// Dynamic shared memory of nf4_gemv_pairs_kernel: from wherever it starts (the window's first 1 KB is reserved on
// sm_90) to the table's end, and for two token tiles past it. The warps' fp32 sums, two buffers (tile parity: a tile's
// sums are written while the tile before's may still be read), sit at its start, below the table, for one token tile
// (32 KB); for two (64 KB, more than fits below) after the table: 192 KB in all, which sm_80 cannot give.
__host__ __device__ constexpr int pairs_sums_bytes(int warps, int token_tiles) {
  return 2 * warps * 16 * 8 * token_tiles * 4;
}
__host__ __device__ constexpr int pairs_smem_bytes(int warps, int token_tiles) {
  return pairs_table_end() + (token_tiles == 1 ? 0 : pairs_sums_bytes(warps, token_tiles));
}

// The codes and scales of a warp's walk, PREFETCH steps ahead: tiles tile0, + stride, ..., each `steps` steps, step
// s bringing quant block first + s where s < count (the warp's blocks). The next load is tracked as one index, tile *
// num_blocks + first + s, with its step s and its tile's last block's index. Every load reads valid memory, so none
// is predicated (a predicated refill made the compiler copy each slot before it, ~10 moves a step): a step past the
// warp's blocks re-reads its tile's last block of the warp's, a step past the last tile the last tile's last block;
// what such a load brings is never used. (A warp with no blocks re-reads the block before its first.)
template <int PREFETCH>
struct WalkRing {
  const uint4* tile_codes;  // 32 uint4 a block: the lane's at + lane (offsets, not per-lane pointers: fewer registers)
  const float2* tile_scales;  // 8 float2 a block: the lane's at + lane / 4
  int lane;
  int at, step, tile_last;  // the next load's index and step, its tile's last block of the warp's
  int steps, jump, next_tile, end;  // jump: a tile's step `steps` to the next's 0; next_tile: stride * num_blocks
  uint4 codes[PREFETCH];
  float2 scales[PREFETCH];

  // The walk's first `preload` steps into slots 0, 1, ...: PREFETCH (take: the refill PREFETCH steps ahead), or
  // PREFETCH - 1 (the one-wait step of nf4_gemv_pairs_kernel's one token tile: the refill one step ahead).
  __device__ __forceinline__ WalkRing(const uint4* tile_codes_, const float2* tile_scales_, int lane_, int tile0,
                                      int stride, int steps_, int first, int last, int row_tiles, int num_blocks,
                                      int preload)
      : tile_codes(tile_codes_), tile_scales(tile_scales_), lane(lane_), at(tile0 * num_blocks + first), step(0),
        tile_last(tile0 * num_blocks + last - 1), steps(steps_), jump(stride * num_blocks - steps_),
        next_tile(stride * num_blocks), end(row_tiles * num_blocks - 1) {
#pragma unroll
    for (int p = 0; p < PREFETCH; ++p) {
      if (p < preload) load(p);
    }
  }

  // The walk's next step into slot p; `z` is 0, computed from loaded registers so that the load issues after them.
  __device__ __forceinline__ void load(int p, uint32_t z = 0) {
    const int i = min(min(at, tile_last), end);
    codes[p] = load_tile_codes(tile_codes + (32 * i + lane + static_cast<int>(z)));
    scales[p] = __ldg(tile_scales + (8 * i + (lane >> 2) + static_cast<int>(z)));
    ++at;
    if (++step == steps) {
      step = 0;
      at += jump;
      tile_last += next_tile;
    }
  }

  // The step held in slot p into cur; slot p refilled with the step PREFETCH ahead.
  __device__ __forceinline__ void take(int p, uint4& cur_codes, float2& cur_scales) {
    cur_codes = codes[p];
    cur_scales = scales[p];
    load(p);
  }
};

// A barrier of the `warps` warps of group `group` (named barrier 1 + group; 0 is __syncthreads').
__device__ __forceinline__ void group_barrier(int group, int warps) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + group), "r"(warps * 32) : "memory");
}

template <typename T, int WARPS, int NT, int PREFETCH, bool ONE_WAIT = false>
__global__ void __launch_bounds__(WARPS * 32, 1024 / (WARPS * 32)) nf4_gemv_pairs_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
    int group_warps) {
  static_assert(PREFETCH % 2 == 0, "x's two buffers take step s's x from buffer s % 2");
  extern __shared__ __align__(16) char smem[];
  const uint32_t window = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  char* pairs = smem + (kPairsTableWindow - window);
  char* sums_at = smem;  // one token tile: below the table
  if constexpr (NT == 1) {
    if (window + pairs_sums_bytes(WARPS, NT) > kPairsTableWindow) __trap();  // more static shared memory than planned
  } else {
    sums_at = smem + (pairs_table_end() - window);
  }
  float(*sums)[WARPS][16][8 * NT] = reinterpret_cast<float(*)[WARPS][16][8 * NT]>(sums_at);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int groups = WARPS / group_warps;
  const int group = warp / group_warps;
  const int member = warp % group_warps;
  const int row_tiles = (N + 15) / 16;
  const int num_blocks = K / 64;
  const int per_warp = (num_blocks + group_warps - 1) / group_warps;
  const int first = min(member * per_warp, num_blocks);
  const int last = min(first + per_warp, num_blocks);
  const int steps = (per_warp + PREFETCH - 1) / PREFETCH * PREFETCH;
  const int workers = gridDim.x * groups;
  const int worker = blockIdx.x * groups + group;

  // Codes in flight while the table fills.
  WalkRing<PREFETCH> ring(tile_codes, tile_scales, lane, worker, workers, steps, first, last, row_tiles, num_blocks,
                          NT == 1 && ONE_WAIT ? PREFETCH - 1 : PREFETCH);
  // 0, though the compiler cannot know it (K > 0): `loaded & zero` is a 0 that waits for `loaded`
  const uint32_t zero = static_cast<uint32_t>(K) >> 31;
  stage_pair_table(table, pairs);
  __syncthreads();
  wait_for_prior_grid();  // x is the kernel ahead's output
  uint32_t pair_reg = kPairsTableWindow | pair_copy_offset();
  asm volatile("" : "+r"(pair_reg));  // after the barrier: every table load's address depends on it
  // token nt * 8 + g (tokens past M re-read token M - 1: their columns are never stored), its 16 k of block 0 for
  // lane t (32-bit offsets in uint4 from x, one register each: x holds at most 2^31 of them)
  int x_at[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) x_at[nt] = min(nt * 8 + g, M - 1) * (K / 8) + 2 * t;
  const uint4* x_words = reinterpret_cast<const uint4*>(x);
  // One token tile: x one step ahead in registers, two buffers (its loads waited at every step before: an L1 or L2
  // round trip between a step's first instruction and its first MMA). A warp with no blocks (first == last, which
  // may be num_blocks: past x's row) reads the last block instead, never used.
  uint32_t xs[2][8];
  if constexpr (NT == 1) load_x_block(x_words + (x_at[0] + 8 * min(first, num_blocks - 1)), xs[0]);

  int parity = 0;
  for (int tile = worker; tile < row_tiles; tile += workers, parity ^= 1) {  // group-uniform
    float acc[NT][4] = {};
    for (int base = 0; base < steps; base += PREFETCH) {
#pragma unroll
      for (int i = 0; i < PREFETCH; ++i) {
        uint4 codes;
        float2 scales;
        const int blk = first + base + i;
        uint32_t z = 0;
        if constexpr (NT == 1 && ONE_WAIT) {
          // One wait for global loads a step, then this step's loads for the next (cuda_nf4.one_wait_for). A warp
          // has a few scoreboards for its loads; ptxas gave every global load of the step one (the table loads hold
          // the others), so the first read of any loaded register waited for all of them: x read by this step's
          // MMAs also waited for the code refill issued the same step, from DRAM (SASS control bits of the sm_90a
          // build; ncu's source page, 8B gate_up at one row on an H100: that MMA held 30% of the warps' stall
          // samples). Here the step's codes, scales and x are read first (z: a 0 computed from them), and the next
          // step's loads take z into their addresses so that they issue after that read: each load has a whole step
          // to land.
          codes = ring.codes[i];
          scales = ring.scales[i];
          z = (codes.x ^ __float_as_uint(scales.x) ^ xs[i % 2][0]) & zero;
          ring.load((i + PREFETCH - 1) % PREFETCH, z);  // the next step, into the slot the last step read
        } else {
          ring.take(i, codes, scales);
        }
        // x of the next step, into the other buffer (steps a tile and PREFETCH are even, so step s's x is in buffer
        // s % 2 on every tile): the next block, or the first for the next tile (a block's x is the same for every
        // tile); a step past the warp's blocks loads the first block too, never used (clamped to x's row)
        if constexpr (NT == 1) {
          load_x_block(x_words + (x_at[0] + static_cast<int>(z) +
                                  8 * min(blk + 1 < last ? blk + 1 : first, num_blocks - 1)),
                       xs[(i + 1) % 2]);
        }
        if (blk < last) {  // warp-uniform
          if constexpr (NT == 1) {
            mma_block<T, true>(nullptr, codes, scales, xs[i % 2], acc[0], pair_reg);
          } else {  // each weight dequantized once for the token tiles, k-step by k-step as nf4_tile_kernel
            uint32_t xb[NT][8];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) load_x_block(x_words + (x_at[nt] + 8 * blk), xb[nt]);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              uint32_t a[2][4];
              a_fragments_pairs_at<T>(pair_reg, codes, scales, half, a);
#pragma unroll
              for (int jj = 0; jj < 2; ++jj) {
                const int j = 2 * half + jj;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                  Ops<T>::mma(acc[nt], a[jj][0], a[jj][1], a[jj][2], a[jj][3], xb[nt][2 * j], xb[nt][2 * j + 1]);
              }
            }
          }
        }
      }
    }
    // C fragment of token tile nt: acc[nt][0..1] = (row g, tokens 8 nt + 2t, + 1), acc[nt][2..3] = (row g + 8, same)
    float(*mine)[8 * NT] = sums[parity][warp];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mine[g][8 * nt + 2 * t] = acc[nt][0];
      mine[g][8 * nt + 2 * t + 1] = acc[nt][1];
      mine[g + 8][8 * nt + 2 * t] = acc[nt][2];
      mine[g + 8][8 * nt + 2 * t + 1] = acc[nt][3];
    }
    group_barrier(group, group_warps);  // the other buffer's readers (the tile before) are past it too
    for (int i = member * 32 + lane; i < 16 * 8 * NT; i += group_warps * 32) {
      const int r = i / (8 * NT), tok = i % (8 * NT);
      const int row = tile * 16 + r;
      if (tok >= M || row >= N) continue;
      float v = 0.f;
      for (int w = 0; w < group_warps; ++w) v += sums[parity][group * group_warps + w][r][tok];
      store_output<T>(v, tok, row, M, N, bias, out, nullptr);
    }
  }
}

}  // namespace
