// x brought by the TMA unit into nf4_wgmma_kernel's stages (nf4_wgmma(..., bulk_x=True); 128 block tokens, the
// dispatch's pick past 64 rows on 4,096+ inputs since the forty-eighth session, or 64). Included by nf4_wgmma.cu
// after nf4_wgmma.cuh.
//
// Why: at 128 rows the default 128-token block is 1.6 of bf16 on the H200 (issue 14's target 1.0), and there x's
// staging is the heaviest part of a stage outside the dequantization: 16 KB of x a block and quant block (against 4 KB
// of codes), each thread's 16-byte loads landing before its four permuted 4-byte stores, a fence, and the barrier
// that waits for the slowest thread's chain. Here a first kernel (x_image_kernel, ~1 MB at 128 rows) writes x once
// as the images those stores would leave in shared memory (store_x_chunk's permutation and 128-byte swizzle: a tile
// placed at a 1,024-byte aligned address reads as the descriptor expects), and the GEMM's thread 0 asks the TMA unit
// for each stage's tile with one bulk copy (cp.async.bulk) on the buffer's mbarrier, kBulkBuffers stages ahead. No
// other thread loads or stores x: every thread waits on the mbarrier's phase before the stage's wgmmas. The same A
// fragments and wgmmas in the same order as nf4_wgmma_kernel<T, BM, 1, 1>: the same bits for the same splits.
//
// With CLUSTER_SUM (nf4_wgmma(..., bulk_x=True, cluster_sum=True); off until timed) the splits of K of a row and token
// group are one thread-block cluster (grid y), and instead of fp32 partials in global memory and split_k_sum_kernel,
// every block stages its accumulators in its shared memory, and each adds a share of the tile's tokens, split by split
// in order, through distributed shared memory, then adds the bias and stores them: split_k_sum_kernel's additions in
// its order (from 0, split 0 first), so the same bits. Why: at 128 rows 8B qkv, o and down split K 5-8 ways, and their
// partials (12-17 MB a call, more than the weight's codes) go to memory and back through a second kernel
// (bench.wgmma_sol --rows 128: qkv 32.6 us with the sum against 26.8 without).
#pragma once

#include <cooperative_groups.h>

#include "nf4_wgmma.cuh"

namespace {

constexpr int kBulkBuffers = 3;  // x tiles in flight: stage s's wgmmas read buffer s % 3 while s + 1, s + 2 land
constexpr int kMaxClusterSplits = 8;  // the portable cluster size

template <int BM, int WARPS = WG_WARPS, bool CLUSTER_SUM = false>
struct BulkSmem {
  static constexpr int x_bytes = BM * 128;
  // with CLUSTER_SUM, a block's accumulators (BM / 2 floats a thread) staged after the loop where the tiles were
  static constexpr int sum_bytes = CLUSTER_SUM ? BM / 2 * WARPS * 32 * 4 : 0;
  static constexpr int region = kBulkBuffers * x_bytes > sum_bytes ? kBulkBuffers * x_bytes : sum_bytes;
  // the region from a 1,024-byte aligned address (up to 1,008 bytes of slack), then one 8-byte mbarrier a buffer (not
  // in the region: an mbarrier's memory is not reused without mbarrier.inval)
  static constexpr int bytes = region + 1024 + 8 * kBulkBuffers;
};

// The cluster's accumulators (its blocks: the splits of K of one row and token group, rank = split) summed a share
// a block: every block stages its own in `stage` (float j of thread i at j * THREADS + i: a warp's loads hit 32
// banks); then block r takes the 8-token groups b with b % size == r (store_accumulators' `share` of `shares`) and
// adds, for those, every block's in rank order (split 0 first, as split_k_sum_kernel: the same bits). Each block
// reads 1/size of the cluster's partials through distributed shared memory. Why shares: the first design had the first
// block read them all while the others waited (7 x 64 KB a cluster at 8 splits), and measured 1.8-2.5x the kernel
// with split_k_sum_kernel at 8B qkv, o and down's 96-128 rows (H100, forty-ninth session,
// bench/results/2026-12-07-nvidia-h100-80gb-hbm3-kernels-s49-cluster.json; a 2-split cluster, 1B gate_up at 96-128
// rows, won: 25.2 against 30.7 us). Both cluster-wide barriers are needed: the first orders the stores before the
// remote loads, the second keeps every block (its shared memory) alive until all have read it.
template <int BM, int THREADS>
__device__ __forceinline__ void cluster_summed(float (&acc)[BM / 2], float* stage, int& share, int& shares) {
#ifdef LORAPLEX_WGMMA  // clusters are sm_90's (the kernel is empty elsewhere)
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  share = static_cast<int>(cluster.block_rank());
  shares = static_cast<int>(cluster.num_blocks());
#pragma unroll
  for (int j = 0; j < BM / 2; ++j) stage[j * THREADS + threadIdx.x] = acc[j];
  cluster.sync();
  for (int r = 0; r < shares; ++r) {
    const float* remote = cluster.map_shared_rank(stage, r);
#pragma unroll
    for (int b = 0; b < BM / 8; ++b) {
      if (b % shares != share) continue;  // the same for the whole block
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float v = remote[(4 * b + e) * THREADS + threadIdx.x];
        acc[4 * b + e] = r == 0 ? v : acc[4 * b + e] + v;
      }
    }
  }
  cluster.sync();
#endif
}

// The mbarrier (shared-memory byte address `bar`) with `count` arrivals a phase; its initialization made visible to
// the async proxy (the TMA unit completes bytes on it) by mbarrier_init_fence.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
#ifdef LORAPLEX_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbarrier_init_fence() {
#ifdef LORAPLEX_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival (the count is 1) that also expects `bytes` to complete this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#ifdef LORAPLEX_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Until the phase of parity `parity` has completed (labels local to the braces: inlined at several places).
__device__ __forceinline__ void mbarrier_wait_parity(uint32_t bar, uint32_t parity) {
#ifdef LORAPLEX_WGMMA
  asm volatile(
      "{\n.reg .pred done;\n"
      "retry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra retry;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
#endif
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global `src` to shared `dst` by the TMA unit,
// completed on mbarrier `bar`.
__device__ __forceinline__ void bulk_copy_to_shared(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#ifdef LORAPLEX_WGMMA
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}

// The word of a tile row (32 words of 128 bytes) where word w of x's 16-byte chunk c of row r lands: chunk
// 4 (c % 2) + w, word c / 2, at chunk ^ (r % 8) (store_x_chunk's permutation and the descriptor's 128-byte swizzle).
__host__ __device__ constexpr int x_image_word(int r, int c, int w) {
  return ((4 * (c & 1) + w) ^ (r & 7)) * 4 + (c >> 1);
}

// x [M, K] as tile images: token group z's quant block b at word (z * K / 64 + b) * BM * 32, BM rows of 128 bytes
// each, as XStage::store leaves a stage's tile (rows past M: row M - 1, as its loads re-read it). A thread a 16-byte
// chunk of x: chunk c of row r's quant block, its words placed by x_image_word.
template <typename T, int BM>
__global__ void __launch_bounds__(256) x_image_kernel(const T* __restrict__ x, uint32_t* __restrict__ images, int M,
                                                      int K) {
  const int blocks = K / 64;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  wait_for_prior_grid();  // x is the kernel ahead's output
  if (q >= static_cast<int64_t>((M + BM - 1) / BM) * blocks * BM * 8) return;
  const int c = static_cast<int>(q & 7), r = static_cast<int>((q >> 3) % BM);
  const int64_t tile = (q >> 3) / BM;  // z * blocks + b
  const int b = static_cast<int>(tile % blocks), z = static_cast<int>(tile / blocks);
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(z * BM + r, M - 1)) * K +
                                                       64 * b + 8 * c));
  uint32_t* row = images + (tile * BM + r) * 32;
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) row[x_image_word(r, c, w)] = words[w];
}

// nf4_wgmma_kernel<T, BM, MIN_BLOCKS, 1> (one quant block a stage) with x's tiles from `images` (x_image_kernel) by
// bulk copies instead of staged by every thread, and WARPS / 4 warpgroups a block (8: two, as the default; 16: four,
// 256 weight rows sharing each tile, so half the x a weight row reads from the L2; 128 tokens only). One barrier a stage, after its
// wgmmas: the buffer they read is free for the stage kBulkBuffers on, which thread 0 then asks for.
template <typename T, int BM, int MIN_BLOCKS, int WARPS = WG_WARPS, bool CLUSTER_SUM = false>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) nf4_wgmma_bulk_x_kernel(
    const uint8_t* __restrict__ images, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  using Smem = BulkSmem<BM, WARPS, CLUSTER_SUM>;
  constexpr int X_BYTES = Smem::x_bytes;
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem));
  const uint32_t tiles = (raw + 1023) & ~1023u;
  const uint32_t bars = tiles + Smem::region;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkBuffers; ++s) mbarrier_init(bars + 8 * s, 1);
    mbarrier_init_fence();
    fence_proxy_async_smem();  // as the CUDA guide's TMA example after the initialization (once a block)
  }
  const char* lut = stage_code_table(table);  // its barrier also orders the mbarriers' initialization

  const WgmmaPlace<WARPS, BM> at(N, K, blocks_per_split);
  const int lane = at.lane, g = at.g, t = at.t, row_tiles = at.row_tiles, tile0 = at.tile0;
  const int num_blocks = at.num_blocks, first = at.first, last = at.last, m0 = at.m0;

  float acc[BM / 2] = {};
  const uint64_t x_desc0 = smem_desc_sw128(tiles);
  const uint8_t* src = images + (static_cast<int64_t>(blockIdx.z) * num_blocks + first) * X_BYTES;
  auto ask = [&](int i) {  // stage i (quant block first + i) into buffer i % kBulkBuffers
    if (threadIdx.x == 0 && first + i < last) {
      const uint32_t bar = bars + 8 * (i % kBulkBuffers);
      mbarrier_arrive_expect_tx(bar, X_BYTES);
      bulk_copy_to_shared(tiles + (i % kBulkBuffers) * X_BYTES, src + static_cast<int64_t>(i) * X_BYTES, X_BYTES,
                          bar);
    }
  };
  TileRing<1, WG_PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  wait_for_prior_grid();  // codes in flight; the images are the kernel ahead's output
#pragma unroll
  for (int i = 0; i < kBulkBuffers; ++i) ask(i);
  for (int base = first; base < last; base += WG_PREFETCH) {
#pragma unroll
    for (int p = 0; p < WG_PREFETCH; ++p) {
      const int blk = base + p;
      if (blk >= last) break;  // the same for every thread of the block: the barrier below stays uniform
      const int i = blk - first;
      uint4 codes[1];
      float2 scales[1];
      ring.take(p, blk, last, codes, scales);
      uint32_t a[1][2][2][4];
      a_fragments<T>(lut, codes[0], scales[0], 0, a[0][0]);
      a_fragments<T>(lut, codes[0], scales[0], 1, a[0][1]);
      mbarrier_wait_parity(bars + 8 * (i % kBulkBuffers), (i / kBulkBuffers) & 1);
      stage_wgmmas<T, BM, 1>(acc, a, smem_desc_advance(x_desc0, (i % kBulkBuffers) * X_BYTES), blk, last);
      __syncthreads();  // every warpgroup's wgmmas of this buffer are done
      ask(i + kBulkBuffers);
    }
  }
  int share = 0, shares = 1;  // with CLUSTER_SUM this block's share of the cluster's summed tile
  if constexpr (CLUSTER_SUM) {  // the tiles' buffers are free: every bulk copy asked for has landed and been read
    cluster_summed<BM, WARPS * 32>(acc, reinterpret_cast<float*>(wg_smem + (tiles - raw)), share, shares);
  }
  store_accumulators<T, BM>(acc, tile0, row_tiles, g, t, m0, M, N, bias, out, partial, share, shares);
#endif
}

}  // namespace
