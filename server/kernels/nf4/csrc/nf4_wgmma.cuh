// NF4 x 16-bit GEMM for prefill-sized batches on Hopper's warpgroup MMA (sm_90a). Included by nf4_wgmma.cu (and
// bench/csrc/wgmma_sol.cu) after nf4_device.cuh, from the same tile layout and A fragments as the other kernels.
//
// The wide kernel's mapping with mma.sync swapped for wgmma: a warp still owns one 16-row tile of the weights and
// dequantizes its quant block into the MMA's A fragments in registers (a_fragments: bit for bit the same weights);
// the 4 warps of a warpgroup hold the 64 rows of one m64nBMk16 wgmma, whose B (BM tokens x 16 of K) the tensor cores
// read from shared memory by descriptor. A block is two warpgroups (128 weight rows) over one x tile of BM tokens, so
// x is read from shared memory once a warpgroup and k-step instead of once a warp and 8-token tile (the wide kernel's
// ~16 bytes of shared-memory reads a weight at 128 rows), and mma.sync no longer bounds it: a block of the same
// shape that dequantized its weights into shared memory and ran ldmatrix + mma.sync over both tiles (twenty-third
// session, removed) ran at ~237 TFLOP/s whatever the rows, slower than dequant + cuBLAS from 128 rows
// (bench/results/2026-12-04-nvidia-h200-kernels-s23-smem.json).
//
// x's k order. The tile layout gives lane t of a quad k in [16t, 16t + 16) of a quant block: in k-step j its columns
// 2t, 2t + 1 are k = 16t + 4j + {0, 1} and its columns 2t + 8, 2t + 9 are k = 16t + 4j + 2 + {0, 1}. The tensor cores
// read B's k-step j as the 16 values at bytes 32j-32j+31 of a token's 128-byte row, so x is stored permuted to match:
// x's 32-bit word w = 8t + 2j + h (k = 2w, 2w + 1) goes to word 8j + 4h + t of the row. A thread stages 16-byte chunks
// of x (words 4c-4c+3: t = c / 2, j = 2 (c % 2) + i / 2, h = i % 2 for word i), i.e. word i of chunk c goes to chunk
// 4 (c % 2) + i, word c / 2 of the row. Chunks sit at chunk ^ (row & 7) in the row (the 128-byte swizzle the
// descriptor names, the tile 1,024-byte aligned); the 8 threads of a row write 8 distinct banks per store.
//
// Pipeline: a stage's x (KB quant blocks: 1, or 2 to halve the barriers and waits) comes by 16-byte loads into
// registers one stage ahead and is stored permuted into the other of two shared-memory buffers after this stage's
// wgmmas have completed; codes come PREFETCH blocks ahead in the tile layout's register ring. With ONE_WAIT (one
// block a stage, the default at 64 tokens: cuda_nf4.one_wait_for; or two) the codes and scales of stage s + 1 and x
// of stage s + 2 are loaded at stage s's start, right after its one wait for the loads the stage before issued, and x
// is stored permuted a stage early into one of three buffers (the kernel's comment says why). One barrier a stage.
// Tokens past M re-read row M - 1 and weight tiles past N the last tile; neither is stored. Split K as the other
// kernels: grid y, fp32 partials summed by split_k_sum_kernel.
#pragma once

#include "nf4_wgmma_ops.cuh"

namespace {

constexpr int WG_WARPS = 8;  // two warpgroups: 128 weight rows a block (WARPS 4: one, 64 rows)
constexpr int WG_PREFETCH = 2;

// A stage is KB quant blocks: x's KB tiles of BM tokens x 64 k (each BM x 128 bytes, 1,024-byte aligned) in one
// buffer, the KB blocks' A fragments in registers, one barrier and one wgmma wait for all of them. (A variant with
// the A fragments from the byte-pair table and one with A dequantized into shared-memory tiles were measured slower
// on an H100, bench/results/2026-12-05-nvidia-h100-80gb-hbm3-kernels-s34-pairs.json, and removed; see git history.)
template <int BM, int KB, bool ONE_WAIT = false>
struct WgmmaSmem {
  static constexpr int x_bytes = KB * BM * 128;
  static constexpr int buffers = ONE_WAIT ? 3 : 2;  // the one-wait stage stores x a stage earlier (the kernel)
  static constexpr int bytes = buffers * x_bytes + 1024;  // and room to align them to 1,024
};

// 16-byte chunk c (x's words 4c-4c+3) of token row `row` of one quant block into `tile` (BM x 128 bytes, 1,024-byte
// aligned): word w to chunk 4 (c % 2) + w, word c / 2, at chunk ^ (row % 8) (the descriptor's 128-byte swizzle).
__device__ __forceinline__ void store_x_chunk(uint8_t* tile, int row, int c, uint4 v) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int chunk = 4 * (c & 1) + w;
    *reinterpret_cast<uint32_t*>(tile + row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * (c >> 1)) = words[w];
  }
}

// x's staging for nf4_wgmma_kernel's stages: a stage's KB quant blocks of BM tokens x 64 k, loaded by each of the
// THREADS threads as CHUNKS 16-byte chunks into registers a stage ahead (load), then stored permuted and swizzled into
// one of the shared-memory buffers (store). Chunk q of a stage: quant block q / (BM * 8) of the stage, token row
// (q / 8) % BM, 16-byte chunk q % 8 (store_x_chunk).
template <typename T, int BM, int KB, int THREADS>
struct XStage {
  static constexpr int CHUNKS = KB * BM * 8 / THREADS;
  uint4 xr[CHUNKS];

  // The stage from quant block blk (blocks past the split, last, re-read its last); tokens past M re-read row M - 1.
  // `z` is 0 (see nf4_wgmma_kernel's one-wait stage), added to the addresses.
  __device__ __forceinline__ void load(const T* __restrict__ x, int M, int K, int m0, int blk, int last,
                                       uint32_t z = 0) {
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int q = threadIdx.x + i * THREADS;
      const int kb = q / (BM * 8), row = KB == 1 ? q >> 3 : (q >> 3) % BM, c = q & 7;
      const int b = KB == 1 ? blk : min(blk + kb, last - 1);  // one block a stage: always within the split
      xr[i] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(m0 + row, M - 1)) * K + 64 * b +
                                                   8 * c + z));
    }
  }

  // Into the buffer at `buffer` (KB tiles of BM x 128 bytes, 1,024-byte aligned), fenced for the async proxy.
  __device__ __forceinline__ void store(uint8_t* buffer) {
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int q = threadIdx.x + i * THREADS, row = KB == 1 ? q >> 3 : (q >> 3) % BM;
      store_x_chunk(buffer + (KB == 1 ? 0 : q / (BM * 8) * BM * 128), row, q & 7, xr[i]);
    }
    fence_proxy_async_smem();
  }
};

// Where a thread of a wgmma block of WARPS warps and BM tokens works: its lane (g, t), its warp's 16-row weight tile
// (tile0, of row_tiles), its split's quant blocks [first, last) of num_blocks, and its token group's first row m0
// (grid: row groups, splits, token groups).
template <int WARPS, int BM>
struct WgmmaPlace {
  int lane, g, t, row_tiles, tile0, num_blocks, first, last, m0;

  __device__ __forceinline__ WgmmaPlace(int N, int K, int blocks_per_split)
      : lane(threadIdx.x & 31), g(lane >> 2), t(lane & 3), row_tiles((N + 15) / 16),
        tile0(blockIdx.x * WARPS + (threadIdx.x >> 5)), num_blocks(K / 64), first(blockIdx.y * blocks_per_split),
        last(min(first + blocks_per_split, num_blocks)), m0(blockIdx.z * BM) {}
};

// A warp's wgmma accumulators of its 16-row tile (store_output; nothing for a tile past the weight): register 4b + e
// of n8 block b is weight row g + 8 (e >> 1), token m0 + 8b + 2t + (e & 1). Only the blocks b with b % shares == share
// (a cluster's block stores its share of the tile it summed: cluster_summed).
template <typename T, int BM>
__device__ __forceinline__ void store_accumulators(const float (&acc)[BM / 2], int tile0, int row_tiles, int g, int t,
                                                   int m0, int M, int N, const T* __restrict__ bias,
                                                   T* __restrict__ out, float* __restrict__ partial, int share = 0,
                                                   int shares = 1) {
  if (tile0 >= row_tiles) return;
#pragma unroll
  for (int b = 0; b < BM / 8; ++b) {
    if (b % shares != share) continue;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = tile0 * 16 + g + 8 * (e >> 1);
      const int tok = m0 + 8 * b + 2 * t + (e & 1);
      if (row < N && tok < M) store_output<T>(acc[4 * b + e], tok, row, M, N, bias, out, partial);
    }
  }
}

// A stage's wgmmas: its KB quant blocks' A fragments against x's tiles at x_desc (a block past the split skipped,
// the same for every thread of the block), committed and waited for before the next stage's dequantization
// rewrites a.
template <typename T, int BM, int KB>
__device__ __forceinline__ void stage_wgmmas(float (&acc)[BM / 2], const uint32_t (&a)[KB][2][2][4], uint64_t x_desc,
                                             int blk, int last) {
  wgmma_fence();
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
    if (kb > 0 && blk + kb >= last) break;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      Wgmma<T, BM>::mma(acc, a[kb][j / 2][j % 2], smem_desc_advance(x_desc, kb * BM * 128 + 32 * j));
    }
  }
  wgmma_commit();
  wgmma_wait_all();
}

// Speed-of-light probes of the stage loop (bench/csrc/wgmma_sol.cu, bench.wgmma_sol; never the server's: its
// instances take PROBE 0), OR-ed: each leaves out one part of a stage's work, so that the time it saves is that
// part's share. NOT the semantics: a probe's output is garbage. No x: x stored once before the loop, every stage's
// wgmmas read that buffer (no x loads, stores or fences in the loop); no barrier: none in the loop; no dequant: the
// raw code words as A (no table loads, multiplies or packs); no MMA: no wgmma, fence or wait (A folded into one
// accumulator so that the dequantization stays).
constexpr int kWgmmaProbeNoX = 1, kWgmmaProbeNoBarrier = 2, kWgmmaProbeNoDequant = 4, kWgmmaProbeNoMma = 8;

template <typename T, int BM, int MIN_BLOCKS, int KB, int WARPS = WG_WARPS, bool ONE_WAIT = false, int PROBE = 0>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) nf4_wgmma_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  constexpr int THREADS = WARPS * 32;
  static_assert(WARPS % 4 == 0 && KB * BM * 8 % THREADS == 0, "whole warpgroups; x's chunks spread evenly");
  constexpr int X_BYTES = WgmmaSmem<BM, KB, ONE_WAIT>::x_bytes;
  static_assert(!ONE_WAIT || KB == 1, "the one-wait stage takes one quant block");
  static_assert(WG_PREFETCH % KB == 0, "a stage takes KB consecutive slots of the code ring");
  static_assert(PROBE == 0 || (!ONE_WAIT && KB == 1), "the probes take the default stage");
  constexpr bool kNoX = PROBE & kWgmmaProbeNoX, kNoBarrier = PROBE & kWgmmaProbeNoBarrier;
  constexpr bool kNoDequant = PROBE & kWgmmaProbeNoDequant, kNoMma = PROBE & kWgmmaProbeNoMma;
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem));
  const uint32_t tiles = (raw + 1023) & ~1023u;
  uint8_t* tiles_ptr = wg_smem + (tiles - raw);
  const char* lut = stage_code_table(table);

  const WgmmaPlace<WARPS, BM> at(N, K, blocks_per_split);
  const int lane = at.lane, g = at.g, t = at.t, row_tiles = at.row_tiles, tile0 = at.tile0;
  const int num_blocks = at.num_blocks, first = at.first, last = at.last, m0 = at.m0;

  float acc[BM / 2] = {};
  const uint64_t x_desc0 = smem_desc_sw128(tiles);  // buffer 0's; the others by smem_desc_advance
  if constexpr (ONE_WAIT) {
    // One wait for global loads a stage (the default at 64 tokens: cuda_nf4.one_wait_for). A warp has a few
    // scoreboards for its loads, and ptxas gave the stage's global loads one (the table loads hold the others), so
    // the first read of any loaded register waited for all:
    // x's store at the stage's end waited for the code refill issued at its start, from DRAM, and so did the copy
    // out of the code ring (SASS control bits of the sm_90a build; ncu's source page, 8B gate_up at 32 rows on an
    // H100: those waits and the block barrier behind them held 45% of the warps' stall samples). Here stage s
    // first reads what the stage before loaded (its codes and scales, x of stage s + 1: z, a 0 computed from
    // them, and x's store), then issues its loads (codes of stage s + 1, x of stage s + 2) with z in their
    // addresses, so that they issue after that read and have a whole stage to land. x of stage s + 1 is stored at
    // stage s's start, a stage early, so three buffers: buffer (s + 1) % 3 was last read by stage s - 2's wgmmas,
    // done by every warp before the barrier of stage s - 1. The same wgmmas in the same order as before: the same
    // bits.
    const uint32_t zero = static_cast<uint32_t>(K) >> 31;  // 0 (K > 0), which the compiler cannot know
    // stage s's codes in slot s % 2 (the loop is unrolled by 2: constant slots), block `first` preloaded
    TileRing<1, 2> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last, 1);
    XStage<T, BM, 1, THREADS> xs[2];  // x of stage s + 1 in set (s + 1) % 2, loaded in stage s - 1
    wait_for_prior_grid();            // codes in flight; x is the kernel ahead's output
    xs[0].load(x, M, K, m0, first, last);
    xs[1].load(x, M, K, m0, min(first + 1, last - 1), last);
    xs[0].store(tiles_ptr);
    int buffer = 0;  // stage s's x buffer, s % 3
    for (int base = first; base < last; base += 2) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int blk = base + p;
        if (blk >= last) break;  // the same for every thread of the block: the barrier below stays uniform
        const int next = buffer == 2 ? 0 : buffer + 1;
        const uint4 codes = ring.codes[p][0];
        const float2 scales = ring.scales[p][0];
        const uint32_t z = (codes.x ^ __float_as_uint(scales.x) ^ xs[1 - p].xr[0].x) & zero;
        if (blk + 1 < last) xs[1 - p].store(tiles_ptr + next * X_BYTES);
        // stage s + 1's codes and stage s + 2's x; past the split: clamped re-reads, never used
        ring.load(1 - p, blk + 1, last, z);
        xs[p].load(x, M, K, m0, min(blk + 2, last - 1), last, z);
        uint32_t a[1][2][2][4];  // [block of the stage][half][k-step of the half][4 registers]
        a_fragments<T>(lut, codes, scales, 0, a[0][0]);
        a_fragments<T>(lut, codes, scales, 1, a[0][1]);
        __syncthreads();  // x of this stage is stored and fenced by all
        stage_wgmmas<T, BM, 1>(acc, a, smem_desc_advance(x_desc0, buffer * X_BYTES), blk, last);
        buffer = next;
      }
    }
    store_accumulators<T, BM>(acc, tile0, row_tiles, g, t, m0, M, N, bias, out, partial);
    return;
  }
  XStage<T, BM, KB, THREADS> xs;  // x of the next stage, in registers until stored
  auto load_x = [&](int blk) { xs.load(x, M, K, m0, blk, last); };
  auto store_x = [&](int buffer) { xs.store(tiles_ptr + buffer * X_BYTES); };
  TileRing<1, WG_PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  wait_for_prior_grid();  // codes in flight; x is the kernel ahead's output
  load_x(first);
  store_x(0);
  for (int base = first; base < last; base += WG_PREFETCH) {
#pragma unroll
    for (int p = 0; p < WG_PREFETCH; p += KB) {
      const int blk = base + p;
      if (blk >= last) break;  // the same for every thread of the block: the barrier below stays uniform
      const int i = kNoX ? 0 : (blk - first) / KB;
      if (!kNoX && blk + KB < last) load_x(blk + KB);
      uint32_t a[KB][2][2][4];  // [block of the stage][half][k-step of the half][4 registers]
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {  // a block past the split takes valid clamped codes; its wgmmas are skipped
        uint4 codes[1];
        float2 scales[1];
        ring.take(p + kb, blk + kb, last, codes, scales);
        if constexpr (kNoDequant) {
          const uint32_t raw[4] = {codes[0].x, codes[0].y, codes[0].z, codes[0].w ^ __float_as_uint(scales[0].x)};
#pragma unroll
          for (int r = 0; r < 16; ++r) a[kb][r / 8][(r / 4) % 2][r % 4] = raw[(r + r / 4) % 4];
        } else {
          a_fragments<T>(lut, codes[0], scales[0], 0, a[kb][0]);
          a_fragments<T>(lut, codes[0], scales[0], 1, a[kb][1]);
        }
      }
      // x of this stage is stored and fenced by all; the other buffer's wgmmas are done
      if constexpr (!kNoBarrier) __syncthreads();
      const uint64_t x_desc = smem_desc_advance(x_desc0, (i & 1) * X_BYTES);
      if constexpr (kNoMma) {
        uint32_t folded = 0;
#pragma unroll
        for (int r = 0; r < 16; ++r) folded ^= a[0][r / 8][(r / 4) % 2][r % 4];
        acc[0] += __uint_as_float(folded);
      } else {
        stage_wgmmas<T, BM, KB>(acc, a, x_desc, blk, last);
      }
      if (!kNoX && blk + KB < last) store_x((i + 1) & 1);
    }
  }

  store_accumulators<T, BM>(acc, tile0, row_tiles, g, t, m0, M, N, bias, out, partial);
#endif
}

}  // namespace
