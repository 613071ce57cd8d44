// NF4 x 16-bit GEMM for prefill-sized batches on Hopper's warpgroup MMA (sm_90a). Included by nf4_mma.cu after its
// cp.async helpers, from the same tile layout and the same A fragments as the tile and wide kernels.
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
// wgmmas have completed; one barrier a stage. Codes come
// PREFETCH blocks ahead in the tile layout's register ring. Tokens past M re-read row M - 1 and weight tiles past N
// the last tile; neither is stored. Split K as the other kernels: grid y, fp32 partials summed by split_k_sum_kernel.
#pragma once

#include "nf4_wgmma_ops.cuh"

namespace {

constexpr int WG_WARPS = 8;  // two warpgroups: 128 weight rows a block (WARPS 4: one, 64 rows)
constexpr int WG_PREFETCH = 2;

// A stage is KB quant blocks: x's KB tiles of BM tokens x 64 k (each BM x 128 bytes, 1,024-byte aligned) in one
// buffer, the KB blocks' A fragments in registers, one barrier and one wgmma wait for all of them. With PAIRS the
// byte-pair table (nf4_device.cuh, kPairTableBytes) comes first, at the start of the dynamic shared memory: its base
// is then the kernel's shared symbol itself, which the compiler folds into each table load as a uniform register
// ([R + UR], nvcc 13). After the two x buffers, whose runtime alignment it added to each address (an IADD a pair:
// 484 instructions a two-block step at 128 tokens, where the 16-entry table's took 479).
template <int BM, int KB, bool PAIRS = false>
struct WgmmaSmem {
  static constexpr int x_bytes = KB * BM * 128;
  static constexpr int pair_bytes = PAIRS ? (kPairTableBytes + 15) / 16 * 16 : 0;
  static constexpr int bytes = pair_bytes + 2 * x_bytes + 1024;  // two x buffers, and room to align them to 1,024
};

// PAIRS: the A fragments from the byte-pair table (a_fragments_pairs: 5 instructions a weight pair against
// a_fragments' 8, the same bits), 64 KB more shared memory a block.
template <typename T, int BM, int MIN_BLOCKS, int KB, int WARPS = WG_WARPS, bool PAIRS = false>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) nf4_wgmma_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  constexpr int THREADS = WARPS * 32;
  static_assert(WARPS % 4 == 0 && KB * BM * 8 % THREADS == 0, "whole warpgroups; x's chunks spread evenly");
  constexpr int CHUNKS = KB * BM * 8 / THREADS;  // x's 16-byte chunks a thread stages a stage
  constexpr int X_BYTES = WgmmaSmem<BM, KB>::x_bytes;
  static_assert(WG_PREFETCH % KB == 0, "a stage takes KB consecutive slots of the code ring");
  constexpr int PAIR_BYTES = WgmmaSmem<BM, KB, PAIRS>::pair_bytes;
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  char* pairs = reinterpret_cast<char*>(wg_smem);
  if constexpr (PAIRS) stage_pair_table(table, pairs);  // stage_code_table's barrier covers it
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem + PAIR_BYTES));
  const uint32_t tiles = (raw + 1023) & ~1023u;
  uint8_t* tiles_ptr = wg_smem + PAIR_BYTES + (tiles - raw);
  const char* lut = stage_code_table(table);
  const uint32_t copy_off = pair_copy_offset();

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tiles = (N + 15) / 16;
  const int tile0 = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  const int m0 = blockIdx.z * BM;

  // Chunk q of a stage: quant block q / (BM * 8) of the stage, token row (q / 8) % BM, 16-byte chunk q % 8.
  // With HALF_ROWS (128 tokens and more) a thread takes whole half-rows instead, unit u: quant block u / (BM * 2),
  // row (u / 2) % BM, chunks p, p + 2, p + 4, p + 6 (p = u % 2): word w of those four chunks is the whole destination
  // chunk 4p + w (words c / 2 = 0-3, in chunk order), so it stores four 16-byte chunks where a thread of single
  // chunks stores sixteen words. The same tile, word for word (tests/unit/test_nf4_wgmma_mapping.py). SASS, sm_90a,
  // a two-block step: 128 tokens 479 -> 459 instructions (454 -> 396 with PAIRS), 256 tokens 603 -> 569, one
  // warpgroup at 128 tokens 733 -> 560 (and no more spills); at 64 tokens (one warpgroup) 479 -> 485, so not there.
  // Written without a GPU at hand, it stages only the PAIRS instances (not in the dispatch by default) until the GPU
  // tests have run it: then the default instances too.
  constexpr bool HALF_ROWS = PAIRS && BM >= 128 && KB * BM * 2 >= THREADS;
  static_assert(!HALF_ROWS || KB * BM * 2 % THREADS == 0, "half-rows spread evenly");
  uint4 xr[CHUNKS];
  auto load_x = [&](int blk) {  // the stage from quant block blk (blocks past the split re-read its last)
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      int kb, row, c;
      if constexpr (HALF_ROWS) {
        const int u = threadIdx.x + (i / 4) * THREADS;
        kb = u / (BM * 2), row = (u >> 1) % BM, c = (u & 1) + 2 * (i % 4);
      } else {
        const int q = threadIdx.x + i * THREADS;
        kb = q / (BM * 8), row = KB == 1 ? q >> 3 : (q >> 3) % BM, c = q & 7;
      }
      const int b = KB == 1 ? blk : min(blk + kb, last - 1);  // one block a stage: always within the split
      xr[i] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(m0 + row, M - 1)) * K + 64 * b +
                                                   8 * c));
    }
  };
  auto store_x = [&](int buffer) {
    if constexpr (HALF_ROWS) {
#pragma unroll
      for (int i = 0; i < CHUNKS / 4; ++i) {
        const int u = threadIdx.x + i * THREADS, row = (u >> 1) % BM, p = u & 1;
        uint8_t* tile = tiles_ptr + buffer * X_BYTES + (KB == 1 ? 0 : u / (BM * 2) * BM * 128);
        const uint4* held = xr + 4 * i;
        const uint4 chunks[4] = {make_uint4(held[0].x, held[1].x, held[2].x, held[3].x),
                                 make_uint4(held[0].y, held[1].y, held[2].y, held[3].y),
                                 make_uint4(held[0].z, held[1].z, held[2].z, held[3].z),
                                 make_uint4(held[0].w, held[1].w, held[2].w, held[3].w)};
#pragma unroll
        for (int w = 0; w < 4; ++w)
          *reinterpret_cast<uint4*>(tile + row * 128 + (((4 * p + w) ^ (row & 7)) << 4)) = chunks[w];
      }
    } else {
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        const int q = threadIdx.x + i * THREADS, row = KB == 1 ? q >> 3 : (q >> 3) % BM, c = q & 7;
        uint8_t* tile = tiles_ptr + buffer * X_BYTES + (KB == 1 ? 0 : q / (BM * 8) * BM * 128);
        const uint32_t words[4] = {xr[i].x, xr[i].y, xr[i].z, xr[i].w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const int chunk = 4 * (c & 1) + w;
          *reinterpret_cast<uint32_t*>(tile + row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * (c >> 1)) = words[w];
        }
      }
    }
    fence_proxy_async_smem();
  };

  float acc[BM / 2] = {};
  const uint64_t x_desc0 = smem_desc_sw128(tiles);  // buffer 0's; the others by smem_desc_advance
  TileRing<1, WG_PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  load_x(first);
  store_x(0);
  for (int base = first; base < last; base += WG_PREFETCH) {
#pragma unroll
    for (int p = 0; p < WG_PREFETCH; p += KB) {
      const int blk = base + p;
      if (blk >= last) break;  // the same for every thread of the block: the barrier below stays uniform
      const int i = (blk - first) / KB;
      if (blk + KB < last) load_x(blk + KB);
      uint32_t a[KB][2][2][4];  // [block of the stage][half][k-step of the half][4 registers]
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {  // a block past the split takes valid clamped codes; its wgmmas are skipped
        uint4 codes[1];
        float2 scales[1];
        ring.take(p + kb, blk + kb, last, codes, scales);
        if constexpr (PAIRS) {
          a_fragments_pairs<T>(pairs, copy_off, codes[0], scales[0], 0, a[kb][0]);
          a_fragments_pairs<T>(pairs, copy_off, codes[0], scales[0], 1, a[kb][1]);
        } else {
          a_fragments<T>(lut, codes[0], scales[0], 0, a[kb][0]);
          a_fragments<T>(lut, codes[0], scales[0], 1, a[kb][1]);
        }
      }
      __syncthreads();  // x of this stage is stored and fenced by all; the other buffer's wgmmas are done
      const uint64_t x_desc = smem_desc_advance(x_desc0, (i & 1) * X_BYTES);
      wgmma_fence();
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {
        if (kb > 0 && blk + kb >= last) break;  // uniform across the block
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          Wgmma<T, BM>::mma(acc, a[kb][j / 2][j % 2], smem_desc_advance(x_desc, kb * BM * 128 + 32 * j));
        }
      }
      wgmma_commit();
      wgmma_wait_all();
      if (blk + KB < last) store_x((i + 1) & 1);
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
