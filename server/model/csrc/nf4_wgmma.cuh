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

#include <type_traits>

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

// x's staging for nf4_wgmma_kernel's stages: a stage's KB quant blocks of BM tokens x 64 k, loaded by each of the
// THREADS threads as CHUNKS 16-byte chunks into registers a stage ahead (load), then stored permuted and swizzled into
// one of the shared-memory buffers (store). Chunk q of a stage: quant block q / (BM * 8) of the stage, token row
// (q / 8) % BM, 16-byte chunk q % 8; its word w (x's word 4 (q % 8) + w of the row) goes to chunk 4 (c % 2) + w, word
// c / 2 (c = q % 8), at chunk ^ (row % 8) (the descriptor's 128-byte swizzle).
// With HALF_ROWS (128 tokens and more) a thread takes whole half-rows instead, unit u: quant block u / (BM * 2),
// row (u / 2) % BM, chunks p, p + 2, p + 4, p + 6 (p = u % 2): word w of those four chunks is the whole destination
// chunk 4p + w (words c / 2 = 0-3, in chunk order), so it stores four 16-byte chunks where a thread of single
// chunks stores sixteen words. The same tile, word for word (tests/unit/test_nf4_wgmma_mapping.py). SASS, sm_90a,
// a two-block step: 128 tokens 479 -> 459 instructions (454 -> 396 with PAIRS), 256 tokens 603 -> 569, one
// warpgroup at 128 tokens 733 -> 560 (and no more spills); at 64 tokens (one warpgroup) 479 -> 485, so not there.
// Written without a GPU at hand, it stages only the PAIRS instances (not in the dispatch by default) until the GPU
// tests have run it: then the default instances too.
template <typename T, int BM, int KB, int THREADS, bool PAIRS>
struct XStage {
  static constexpr int CHUNKS = KB * BM * 8 / THREADS;
  static constexpr bool HALF_ROWS = PAIRS && BM >= 128 && KB * BM * 2 >= THREADS;
  static_assert(!HALF_ROWS || KB * BM * 2 % THREADS == 0, "half-rows spread evenly");
  uint4 xr[CHUNKS];

  // The stage from quant block blk (blocks past the split, last, re-read its last); tokens past M re-read row M - 1.
  __device__ __forceinline__ void load(const T* __restrict__ x, int M, int K, int m0, int blk, int last) {
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
  }

  // Into the buffer at `buffer` (KB tiles of BM x 128 bytes, 1,024-byte aligned), fenced for the async proxy.
  __device__ __forceinline__ void store(uint8_t* buffer) {
    if constexpr (HALF_ROWS) {
#pragma unroll
      for (int i = 0; i < CHUNKS / 4; ++i) {
        const int u = threadIdx.x + i * THREADS, row = (u >> 1) % BM, p = u & 1;
        uint8_t* tile = buffer + (KB == 1 ? 0 : u / (BM * 2) * BM * 128);
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
        uint8_t* tile = buffer + (KB == 1 ? 0 : q / (BM * 8) * BM * 128);
        const uint32_t words[4] = {xr[i].x, xr[i].y, xr[i].z, xr[i].w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const int chunk = 4 * (c & 1) + w;
          *reinterpret_cast<uint32_t*>(tile + row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * (c >> 1)) = words[w];
        }
      }
    }
    fence_proxy_async_smem();
  }
};

// A warp's wgmma accumulators of its 16-row tile (store_output; nothing for a tile past the weight): register 4b + e
// of n8 block b is weight row g + 8 (e >> 1), token m0 + 8b + 2t + (e & 1).
template <typename T, int BM>
__device__ __forceinline__ void store_accumulators(const float (&acc)[BM / 2], int tile0, int row_tiles, int g, int t,
                                                   int m0, int M, int N, const T* __restrict__ bias,
                                                   T* __restrict__ out, float* __restrict__ partial) {
  if (tile0 >= row_tiles) return;
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

  XStage<T, BM, KB, THREADS, PAIRS> xs;  // x of the next stage, in registers until stored
  auto load_x = [&](int blk) { xs.load(x, M, K, m0, blk, last); };
  auto store_x = [&](int buffer) { xs.store(tiles_ptr + buffer * X_BYTES); };

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

  store_accumulators<T, BM>(acc, tile0, row_tiles, g, t, m0, M, N, bias, out, partial);
#endif
}


// The 128-token block with A from shared memory (SMEM_A; nf4_wgmma(..., smem_a=True)): at 128 rows the default block
// ran its tensor pipe 27% busy (ncu, twenty-fifth session), each warpgroup dequantizing, then waiting for its wgmmas,
// in turn. Here each warp dequantizes its 16 rows of the next quant block (from the byte-pair table) into its
// warpgroup's other A tile in shared memory while the tensor cores run this block's wgmmas, A and B both by
// descriptor (WgmmaSS), so no A fragments stay in registers across them. The A tile has x's form (64 rows of 128
// bytes, K-major, 128-byte swizzle, the same permuted k order), so a fragment register's two values go where the
// tensor cores read its (row, column) of k-step j: a0 row g, bytes 32j + 4t; a1 row g + 8, the same; a2 and a3 16
// bytes on (store_a_fragments; tests/unit/test_nf4_wgmma_mapping.py). Buffers: A two a warpgroup (tile i % 2 is
// rewritten for block i + 2 once this warpgroup's wgmmas of block i are done: wgmma_wait_group<1> after block i + 1's
// are issued), x three (stage i + 1 is stored while block i's wgmmas run, into the buffer block i - 2's used, which
// every warpgroup finished before the barrier of block i). The same wgmmas in the same order as the default block
// with pairs: the same bits, expected (the GPU tests compare them). Written without a GPU at hand: not measured.
constexpr int SA_TOKENS = 128;
constexpr int SA_X_BUFFERS = 3;

struct WgmmaSaSmem {
  static constexpr int pair_bytes = (kPairTableBytes + 15) / 16 * 16;
  static constexpr int x_bytes = SA_TOKENS * 128;
  static constexpr int a_bytes = 64 * 128;  // one warpgroup's A tile: 64 rows x 64 k
  // the table, 1,024 bytes of alignment room, three x buffers, two A tiles for each of the two warpgroups
  static constexpr int bytes = pair_bytes + 1024 + SA_X_BUFFERS * x_bytes + 2 * 2 * a_bytes;
};

// The shared-memory addresses store_a_fragments writes through, for the lane (g, t) whose first row in its
// warpgroup's A tile 0 (at shared address `a_tile`, 1,024-byte aligned) is r = 16 w + g: logical chunk c (0-7) of row
// r sits at chunk c ^ g (r & 7 = g), i.e. at ((a_tile + 128 r + 4t) | 16 g) ^ 16 c (bits 4-6 of a_tile + 128 r + 4t
// are zero), row r + 8 1,024 bytes on, tile 1 Smem::a_bytes on: one register a chunk, the rest immediate offsets.
__device__ __forceinline__ void a_tile_addresses(uint32_t a_tile, int r, int g, int t, uint32_t (&at)[8]) {
  const uint32_t lane_at = (a_tile + 128 * r + 4 * t) | (16 * g);
#pragma unroll
  for (int c = 0; c < 8; ++c) at[c] = lane_at ^ (16 * c);
}

// The A fragments of half `half` of a quant block (a[jj] for k-step j = 2 half + jj) into A tile OFFSET / a_bytes, as
// the tensor cores read them: a0 row r, logical bytes 32j + 4t (chunk 2j); a1 row r + 8; a2 and a3 the next chunk.
template <int OFFSET>
__device__ __forceinline__ void store_a_fragments(const uint32_t (&at)[8], int half, const uint32_t (&a)[2][4]) {
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // a[jj][2h] row r, a[jj][2h + 1] row r + 8, in chunk 2j + h
      const uint32_t chunk_at = at[2 * (2 * half + jj) + h];
      asm volatile("st.shared.b32 [%0+%2], %1;" ::"r"(chunk_at), "r"(a[jj][2 * h]), "n"(OFFSET) : "memory");
      asm volatile("st.shared.b32 [%0+%2], %1;" ::"r"(chunk_at), "r"(a[jj][2 * h + 1]), "n"(OFFSET + 1024)
                   : "memory");
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(WG_WARPS * 32, 1) nf4_wgmma_sa_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  constexpr int BM = SA_TOKENS, THREADS = WG_WARPS * 32;
  using Smem = WgmmaSaSmem;
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  char* pairs = reinterpret_cast<char*>(wg_smem);
  stage_pair_table(table, pairs);
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem + Smem::pair_bytes));
  const uint32_t tiles = (raw + 1023) & ~1023u;  // x buffers, then A tiles (all multiples of 1,024 bytes)
  uint8_t* x_tiles = wg_smem + Smem::pair_bytes + (tiles - raw);
  const int warp = threadIdx.x >> 5, warpgroup = warp >> 2;
  const uint32_t a_tiles = tiles + SA_X_BUFFERS * Smem::x_bytes + warpgroup * 2 * Smem::a_bytes;
  __syncthreads();  // the table
  const uint32_t copy_off = pair_copy_offset();

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tiles = (N + 15) / 16;
  const int tile0 = blockIdx.x * WG_WARPS + warp;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  const int m0 = blockIdx.z * BM;
  uint32_t a_at[8];
  a_tile_addresses(a_tiles, 16 * (warp & 3) + g, g, t, a_at);

  XStage<T, BM, 1, THREADS, true> xs;
  TileRing<1, WG_PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  // Quant block blk (ring slot p) dequantized into A tile `buffer` (0 or 1, a compile-time constant: the loop below
  // is unrolled by the ring's 2 slots) of this warpgroup, fenced for the async proxy.
  auto dequantize = [&](int p, int blk, auto buffer) {
    uint4 codes[1];
    float2 scales[1];
    ring.take(p, blk, last, codes, scales);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint32_t a[2][4];
      a_fragments_pairs<T>(pairs, copy_off, codes[0], scales[0], half, a);
      store_a_fragments<decltype(buffer)::value * Smem::a_bytes>(a_at, half, a);
    }
    fence_proxy_async_smem();
  };

  float acc[BM / 2] = {};
  const uint64_t x_desc0 = smem_desc_sw128(tiles), a_desc0 = smem_desc_sw128(a_tiles);
  xs.load(x, M, K, m0, first, last);
  xs.store(x_tiles);
  if (first + 1 < last) xs.load(x, M, K, m0, first + 1, last);
  dequantize(0, first, std::integral_constant<int, 0>());
  static_assert(WG_PREFETCH == 2, "blocks alternate between the ring's two slots and the two A tiles");
  // Block blk = base + P (base - first even): ring slot and A tile P; block blk + 1 slot and tile 1 - P.
  auto step = [&](int base, auto P) {
    constexpr int p = decltype(P)::value;
    const int blk = base + p, i = blk - first;
    __syncthreads();  // x of block i and every warp's A rows of it are stored and fenced
    const uint64_t x_desc = smem_desc_advance(x_desc0, (i % SA_X_BUFFERS) * Smem::x_bytes);
    const uint64_t a_desc = smem_desc_advance(a_desc0, p * Smem::a_bytes);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) WgmmaSS<T, BM>::mma(acc, smem_desc_advance(a_desc, 32 * j),
                                                    smem_desc_advance(x_desc, 32 * j));
    wgmma_commit();
    if (blk + 1 < last) {  // while they run: x of block i + 1 into its buffer, x of i + 2 loaded, A of i + 1
      xs.store(x_tiles + ((i + 1) % SA_X_BUFFERS) * Smem::x_bytes);
      if (blk + 2 < last) xs.load(x, M, K, m0, blk + 2, last);
      wgmma_wait_group<1>();  // this warpgroup's wgmmas of block i - 1, which read A tile 1 - p, are done
      dequantize(1 - p, blk + 1, std::integral_constant<int, 1 - p>());
    }
  };
  for (int base = first; base < last; base += WG_PREFETCH) {  // the same for every thread: the barriers stay uniform
    step(base, std::integral_constant<int, 0>());
    if (base + 1 < last) step(base, std::integral_constant<int, 1>());
  }
  wgmma_wait_group<0>();

  store_accumulators<T, BM>(acc, tile0, row_tiles, g, t, m0, M, N, bias, out, partial);
#endif
}

}  // namespace
