// Speed-of-light probes of the NF4 one-row kernel (bench/nf4_sol.py): how fast the work nf4_tile_kernel does at one
// row could go, step by step, over the same tile layout and with the same device helpers (server/kernels/nf4/csrc/
// nf4_device.cuh). Each warp walks one 16-row tile over its split of K, as the tile kernel does, and folds what it
// computed into one word a lane (a sink the compiler cannot drop); nothing is summed or stored otherwise.
//   mode 0: the code and scale loads alone (the bandwidth floor of the NF4 bytes);
//   mode 1: + the exact dequantization of every weight into A fragments (table lookup, fp32 scale, rounding);
//   mode 2: + the MMAs, against one constant x fragment;
//   mode 3: + x's fragments loaded from global memory a block at a time (the tile kernel less its split-K sum);
//   mode 4: mode 1's dequantization with no loads in the loop (the first block's codes, their nibbles varied block
//           by block): the dequantization's own rate, which no overlap with the loads can beat.
//   mode 5: mode 1 with the byte-pair table (nf4_device.cuh, a_fragments_pairs): a byte's two fp32 code values by
//           one 8-byte load from a table of all 256 byte values (16 copies, one a lane of a half-warp: no bank
//           conflicts; 64 KB a block), its address one byte permute, then the same two multiplies and pack: 5
//           instructions a weight pair where mode 1 takes 8, half the loads (the kernel nf4_gemv_pairs runs);
//   mode 6: mode 5 with no loads in the loop (as mode 4);
//   mode 7: NOT the semantics, a floor for any table dequantization: a byte's two codes as bf16 from a 4-byte table
//           (32 copies, one a lane), times the scale as bf16 in one bf16x2 multiply (each weight rounded twice), 3
//           instructions a pair. If mode 7 with the loads is above 0.45 of bf16, no table sequence meets m1 <= 0.45.
//   mode 8: NOT the semantics, mode 6 (the pair table, no loads) with each pair packed by one byte permute of the two
//           products' upper halves (truncation) instead of the rounding pack (F2FP, a conversion: Hopper issues those
//           at a fraction of the fp32 rate): how much of the exact dequantization's own rate the rounding costs;
//   mode 9: NOT the semantics, mode 5 (the pair table with the loads) packed as mode 8.
// Blocks of 2, 4 or 32 warps (32: one block an SM beside the 64 KB table, as nf4_gemv_pairs; at 2-4 warps the table
// modes fit 6-12 warps an SM).
// Built by nvcc alone (no torch headers), called through ctypes. Not part of the server.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "nf4_device.cuh"

namespace {

constexpr int kPrefetch = 4;  // as the tile kernel's instances

// Mode 7's table: bf16x2 (code[byte >> 4], code[byte & 15]) of byte value v, copy c at byte 256 v + 4 c (the pair
// table's rows, nf4_device.cuh: pair_offset addresses both); lane l reads copy l, bank l.
constexpr int kHalfCopies = 32;

// Modes 8-9: a_fragments_pairs with the pack truncating (one byte permute of the upper halves) instead of rounding.
__device__ __forceinline__ void a_fragments_pairs_truncated(const char* pairs, uint32_t copy_off, uint4 codes,
                                                            float2 scales, int half, uint32_t (&a)[2][4]) {
  byte_table_fragments(codes, half, [&](uint32_t word, int b, int row) {
    const float2 v = *reinterpret_cast<const float2*>(pairs + pair_offset(word, b, copy_off));
    const float scale = row ? scales.y : scales.x;
    return __byte_perm(__float_as_uint(v.x * scale), __float_as_uint(v.y * scale), 0x7632);
  }, a);
}

// Mode 7: the byte's two bf16 codes by one 4-byte load, times the row's scale as bf16 in one bf16x2 multiply.
__device__ __forceinline__ void a_fragments_bf16(const char* halves, uint32_t copy_off, uint4 codes, float2 scales,
                                                 int half, uint32_t (&a)[2][4]) {
  const __nv_bfloat162 s_lo = __float2bfloat162_rn(scales.x), s_hi = __float2bfloat162_rn(scales.y);
  byte_table_fragments(codes, half, [&](uint32_t word, int b, int row) {
    const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(halves + pair_offset(word, b, copy_off)),
                                     row ? s_hi : s_lo);
    return *reinterpret_cast<const uint32_t*>(&v);
  }, a);
}

template <int MODE, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) nf4_sol_kernel(const uint4* __restrict__ tile_codes,
                                                             const float2* __restrict__ tile_scales,
                                                             const float* __restrict__ table,
                                                             const __nv_bfloat16* __restrict__ x, uint32_t x_word,
                                                             uint32_t* __restrict__ sink, int N, int K,
                                                             int blocks_per_split) {
  using T = __nv_bfloat16;
  const char* lut = stage_code_table(table);
  // Modes 5-7's byte tables: dynamic shared memory, kPairTableBytes (launch); none for the other modes.
  extern __shared__ __align__(16) char bytes[];
  uint32_t copy_off = 0;
  if constexpr (MODE == 5 || MODE == 6 || MODE == 8 || MODE == 9) {
    stage_pair_table(table, bytes);
    copy_off = pair_copy_offset();
    __syncthreads();
  } else if constexpr (MODE == 7) {
    for (int i = threadIdx.x; i < 256 * kHalfCopies; i += blockDim.x) {
      const int v = i / kHalfCopies;
      *reinterpret_cast<__nv_bfloat162*>(bytes + 256 * v + 4 * (i % kHalfCopies)) =
          __floats2bfloat162_rn(table[v >> 4], table[v & 15]);
    }
    copy_off = 4u * (threadIdx.x & (kHalfCopies - 1));
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int t = lane & 3;
  const int tile0 = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int row_tiles = (N + 15) / 16;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  if (tile0 >= row_tiles) return;
  const uint4* x_at = reinterpret_cast<const uint4*>(x) + 2 * t;

  uint32_t folded = 0u;
  float acc[4] = {};
  TileRing<1, kPrefetch> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  for (int base = first; base < last; base += kPrefetch) {
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      const int blk = base + i;
      if (blk >= last) break;
      uint4 codes[1];
      float2 scales[1];
      if constexpr (MODE == 4 || MODE == 6 || MODE == 8) {
        const uint32_t salt = static_cast<uint32_t>(blk) * 0x01010101u;  // other nibbles, other table entries
        const uint4 held = ring.codes[0][0];
        codes[0] = make_uint4(held.x ^ salt, held.y ^ salt, held.z ^ salt, held.w ^ salt);
        scales[0] = ring.scales[0][0];
      } else {
        ring.take(i, blk, last, codes, scales);
      }
      if constexpr (MODE == 0) {
        folded ^= codes[0].x ^ codes[0].y ^ codes[0].z ^ codes[0].w ^ __float_as_uint(scales[0].x) ^
                  __float_as_uint(scales[0].y);
      } else if constexpr (MODE == 1 || MODE >= 4) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          uint32_t a[2][4];
          if constexpr (MODE == 5 || MODE == 6) {
            a_fragments_pairs<T>(bytes, copy_off, codes[0], scales[0], half, a);
          } else if constexpr (MODE == 8 || MODE == 9) {
            a_fragments_pairs_truncated(bytes, copy_off, codes[0], scales[0], half, a);
          } else if constexpr (MODE == 7) {
            a_fragments_bf16(bytes, copy_off, codes[0], scales[0], half, a);
          } else {
            a_fragments<T>(lut, codes[0], scales[0], half, a);
          }
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) folded ^= a[jj][0] ^ a[jj][1] ^ a[jj][2] ^ a[jj][3];
        }
      } else {
        uint32_t xb[8];
#pragma unroll
        for (int w = 0; w < 8; ++w) xb[w] = x_word;
        if (MODE == 3) load_x_block(x_at + 8 * blk, xb);
        mma_block<T>(lut, codes[0], scales[0], xb, acc);
      }
    }
  }
  folded ^= __float_as_uint(acc[0] + acc[1] + acc[2] + acc[3]);
  sink[static_cast<int64_t>(blockIdx.y) * gridDim.x * blockDim.x + blockIdx.x * blockDim.x + threadIdx.x] = folded;
}

template <int MODE, int WARPS>
cudaError_t launch(cudaStream_t stream, const void* codes, const void* scales, const float* table, const void* x,
                   uint32_t x_word, uint32_t* sink, int N, int K, int splits) {
  const int row_tiles = (N + 15) / 16, num_blocks = K / 64;
  const int blocks_per_split = (num_blocks + splits - 1) / splits;
  const int used_splits = (num_blocks + blocks_per_split - 1) / blocks_per_split;
  const int smem = MODE >= 5 ? kPairTableBytes : 0;
  if (smem > 0) {
    const cudaError_t err = cudaFuncSetAttribute(nf4_sol_kernel<MODE, WARPS>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  nf4_sol_kernel<MODE, WARPS><<<dim3((row_tiles + WARPS - 1) / WARPS, used_splits), WARPS * 32, smem, stream>>>(
      static_cast<const uint4*>(codes), static_cast<const float2*>(scales), table,
      static_cast<const __nv_bfloat16*>(x), x_word, sink, N, K, blocks_per_split);
  return cudaGetLastError();
}

}  // namespace

// Threads of the grid a probe launches (the sink's length in words).
extern "C" long long loraplex_nf4_sol_sink_words(int warps, int N, int K, int splits) {
  const int row_tiles = (N + 15) / 16, num_blocks = K / 64;
  const int blocks_per_split = (num_blocks + splits - 1) / splits;
  const long long used_splits = (num_blocks + blocks_per_split - 1) / blocks_per_split;
  return used_splits * ((row_tiles + warps - 1) / warps) * warps * 32;
}

// One probe of `mode` (0-9, above) with `warps` (2, 4 or 32) warps a block over the tile layout of an [N, K] weight;
// x: K bf16 values (mode 3). Returns the launch's cudaError_t.
extern "C" int loraplex_nf4_sol(int mode, int warps, void* stream, const void* codes, const void* scales,
                                const float* table, const void* x, unsigned x_word, uint32_t* sink, int N, int K,
                                int splits) {
  auto s = static_cast<cudaStream_t>(stream);
#define LORAPLEX_SOL(MODE)                                                                               \
  if (mode == MODE) {                                                                                    \
    if (warps == 2) return launch<MODE, 2>(s, codes, scales, table, x, x_word, sink, N, K, splits);      \
    if (warps == 4) return launch<MODE, 4>(s, codes, scales, table, x, x_word, sink, N, K, splits);      \
    if (warps == 32) return launch<MODE, 32>(s, codes, scales, table, x, x_word, sink, N, K, splits);    \
    return static_cast<int>(cudaErrorInvalidValue);                                                      \
  }
  LORAPLEX_SOL(0)
  LORAPLEX_SOL(1)
  LORAPLEX_SOL(2)
  LORAPLEX_SOL(3)
  LORAPLEX_SOL(4)
  LORAPLEX_SOL(5)
  LORAPLEX_SOL(6)
  LORAPLEX_SOL(7)
  LORAPLEX_SOL(8)
  LORAPLEX_SOL(9)
#undef LORAPLEX_SOL
  return static_cast<int>(cudaErrorInvalidValue);
}
