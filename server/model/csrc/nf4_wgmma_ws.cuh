// The warpgroup-MMA NF4 kernel (nf4_wgmma.cuh) with its warps specialized: a producer warpgroup stages x into a ring
// of WS_STAGES shared-memory buffers, two consumer warpgroups (128 weight rows, as the default block) dequantize and
// run the wgmmas. Included by nf4_mma.cu after nf4_wgmma.cuh (its x permutation, descriptors and wgmma wrappers).
//
// Why: the default block stages x itself, two buffers deep, and meets at a block barrier every quant block, so both
// warpgroups dequantize at the same time, then both issue their wgmmas and wait for them, then store the next x: at
// 128 tokens (one block an SM, 8 warps) it issued on 27% of cycles (ncu, 8B gate_up, twenty-fifth session) and ran at
// 1.6x bf16. Here nothing is block-wide after the start: each buffer has an mbarrier the producer's 128 threads
// arrive on once it is stored ("full") and one the consumers' 256 threads arrive on once their wgmmas that read it
// are done ("empty"). A consumer warpgroup only waits for the x it needs, so the two drift apart and one's
// dequantization runs beside the other's wgmmas, and the producer runs up to WS_STAGES quant blocks ahead, its loads
// issued one quant block before their stores.
//
// Each consumer warpgroup issues the same wgmmas in the same order into the same accumulators as the default block:
// the same bits for the same splits. Grid, splits and token groups as the default (row groups of 128 weight rows).
#pragma once

#include "nf4_wgmma.cuh"

namespace {

constexpr int WS_CONSUMER_WARPS = 8;                        // two warpgroups of 16-row tiles: 128 weight rows
constexpr int WS_PRODUCER_THREADS = 128;                    // one warpgroup staging x
constexpr int WS_THREADS = WS_CONSUMER_WARPS * 32 + WS_PRODUCER_THREADS;
constexpr int WS_STAGES = 4;

template <int BM>
struct WgmmaWsSmem {
  static constexpr int x_bytes = BM * 128;                     // one quant block of BM tokens
  static constexpr int bytes = WS_STAGES * x_bytes + 1024;     // the ring, and room to align it to 1,024 bytes
};

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrive (release, CTA scope): this thread's earlier shared-memory writes and reads are ordered before the phase ends.
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Wait (acquire) until the phase of `parity` has completed; a fresh barrier counts its phase before 0 (parity 1) done.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

template <typename T, int BM, int MIN_BLOCKS>
__global__ void __launch_bounds__(WS_THREADS, MIN_BLOCKS) nf4_wgmma_ws_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  constexpr int X_BYTES = WgmmaWsSmem<BM>::x_bytes;
  constexpr int CHUNKS = BM * 8 / WS_PRODUCER_THREADS;  // x's 16-byte chunks a producer thread stages a quant block
  static_assert(BM * 8 % WS_PRODUCER_THREADS == 0, "x's chunks spread evenly over the producer");
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  __shared__ __align__(8) uint64_t full[WS_STAGES];   // x of the buffer stored (producer's arrivals)
  __shared__ __align__(8) uint64_t empty[WS_STAGES];  // the buffer's wgmmas done (consumers' arrivals)
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < WS_STAGES; ++s) {
      mbarrier_init(full0 + 8 * s, WS_PRODUCER_THREADS);
      mbarrier_init(empty0 + 8 * s, WS_CONSUMER_WARPS * 32);
    }
  }
  const char* lut = stage_code_table(table);  // its block barrier also publishes the barriers' initialization
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem));
  const uint32_t tiles = (raw + 1023) & ~1023u;
  uint8_t* tiles_ptr = wg_smem + (tiles - raw);

  const int warp = threadIdx.x >> 5;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  const int m0 = blockIdx.z * BM;

  if (warp >= WS_CONSUMER_WARPS) {  // the producer: x of quant block blk into buffer (blk - first) % WS_STAGES
    const int p = threadIdx.x - WS_CONSUMER_WARPS * 32;
    // Chunk q = p + i * 128 of a quant block: token row q / 8, 16-byte chunk q % 8 (as nf4_wgmma_kernel's store_x)
    const T* x_at[CHUNKS];
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int q = p + i * WS_PRODUCER_THREADS, row = q >> 3, c = q & 7;
      x_at[i] = x + static_cast<int64_t>(min(m0 + row, M - 1)) * K + 8 * c;
    }
    uint4 cur[CHUNKS], next[CHUNKS];
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) cur[i] = __ldg(reinterpret_cast<const uint4*>(x_at[i] + 64 * first));
    for (int blk = first; blk < last; ++blk) {
      const int n = blk - first, slot = n % WS_STAGES;
      const int ahead = min(blk + 1, last - 1);  // the last block re-reads itself (never stored)
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) next[i] = __ldg(reinterpret_cast<const uint4*>(x_at[i] + 64 * ahead));
      mbarrier_wait(empty0 + 8 * slot, ((n / WS_STAGES) & 1) ^ 1);
      uint8_t* tile = tiles_ptr + slot * X_BYTES;
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        const int q = p + i * WS_PRODUCER_THREADS, row = q >> 3, c = q & 7;
        const uint32_t words[4] = {cur[i].x, cur[i].y, cur[i].z, cur[i].w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const int chunk = 4 * (c & 1) + w;
          *reinterpret_cast<uint32_t*>(tile + row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * (c >> 1)) = words[w];
        }
      }
      fence_proxy_async_smem();  // the stores, visible to the wgmmas' reads
      mbarrier_arrive(full0 + 8 * slot);
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) cur[i] = next[i];
    }
    return;
  }

  // A consumer warp: one 16-row tile, its warpgroup's m64nBMk16 wgmmas over each quant block of the split.
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tiles = (N + 15) / 16;
  const int tile0 = blockIdx.x * WS_CONSUMER_WARPS + warp;
  float acc[BM / 2] = {};
  const uint64_t x_desc0 = smem_desc_sw128(tiles);
  TileRing<1, WG_PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  for (int base = first; base < last; base += WG_PREFETCH) {
#pragma unroll
    for (int p = 0; p < WG_PREFETCH; ++p) {
      const int blk = base + p;
      if (blk >= last) break;  // the same for every consumer: each arrives once a quant block
      const int n = blk - first, slot = n % WS_STAGES;
      uint32_t a[2][2][4];  // [half][k-step of the half][4 registers]
      uint4 codes[1];
      float2 scales[1];
      ring.take(p, blk, last, codes, scales);
      a_fragments<T>(lut, codes[0], scales[0], 0, a[0]);
      a_fragments<T>(lut, codes[0], scales[0], 1, a[1]);
      mbarrier_wait(full0 + 8 * slot, (n / WS_STAGES) & 1);
      const uint64_t x_desc = smem_desc_advance(x_desc0, slot * X_BYTES);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) Wgmma<T, BM>::mma(acc, a[j / 2][j % 2], smem_desc_advance(x_desc, 32 * j));
      wgmma_commit();
      wgmma_wait_all();
      mbarrier_arrive(empty0 + 8 * slot);
    }
  }

  // Accumulator of n8 block b: registers 4b, 4b + 1 weight row g, tokens 8b + 2t, + 1; 4b + 2, 4b + 3 row g + 8.
  if (tile0 < row_tiles) {
#pragma unroll
    for (int b = 0; b < BM / 8; ++b) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = tile0 * 16 + g + 8 * (e >> 1);
        const int tok = m0 + 8 * b + 2 * t + (e & 1);
        if (row < N && tok < M) store_output<T>(acc[4 * b + e], tok, row, M, N, bias, out, partial);
      }
    }
  }
#endif
}

}  // namespace
