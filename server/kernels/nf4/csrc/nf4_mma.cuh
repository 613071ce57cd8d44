// NF4 (bitsandbytes layout) x bf16/fp16 matmul on tensor cores for few rows: y[M, N] = x[M, K] @ W^T.
//
// Semantics (server/kernels/nf4/nf4_ops.py): W[n, k] = round_to_T(code_table[nibble] * absmax_f[block]) in fp32,
// products summed in fp32 (mma.sync accumulates in fp32), + bias, stored as T (or fp32 split-K partials).
//
// Layout read as stored by bitsandbytes, no repacking: row-major, byte i of a row holds element 2i in its
// high nibble and 2i + 1 in its low nibble; one fp32 absmax per 64 elements.
//
// Mapping. A warp owns 16 weight rows (the MMA's M side: rows g and g + 8 of lane = 4 * g + t) and walks
// K one 64-element quant block at a time (4 MMA k-steps of 16). The MMA sums over k in any order as long
// as A and B agree, so k is permuted: lane t of a quad holds k in [16t, 16t + 16) of the block, i.e. 8
// contiguous code bytes of each of its two rows (one 8-byte load per row, 32 contiguous bytes per quad).
// In k-step j, fragment column pair p (0: columns 2t, 2t+1; 1: columns 2t+8, 2t+9) is code byte 2j + p of
// the lane's 8, whose two nibbles are the pair's two columns; x (the B side, tokens on N) is read with the
// same permutation: b0 = x[tok, 16t + 4j + {0,1}], b1 = x[tok, 16t + 4j + 2 + {0,1}].
// Dequantization: the 16-entry fp32 table sits in shared memory (lanes reading one entry broadcast, lanes
// reading different entries hit different banks: one wavefront), scaled in fp32, rounded in pairs.
// Code loads run PREFETCH blocks ahead in registers. Grid: (row tiles / WARPS, split_k); with split_k > 1
// each split writes fp32 partials [split_k, M, N] that a second kernel sums.
//
// Included by nf4_mma.cu (inside its anonymous namespace, after nf4_device.cuh), with nf4_tile.cuh and nf4_gemm.cuh.
#pragma once

// One quant block's inputs for one lane: its 8 code bytes of rows g and g + 8, their two scales.
struct BlockCodes {
  uint2 row_lo;  // row g
  uint2 row_hi;  // row g + 8
  float scale_lo;
  float scale_hi;
};

__device__ __forceinline__ uint2 load_codes(const uint8_t* p, bool ok) {
  uint2 v = make_uint2(0u, 0u);
  if (ok) asm volatile("ld.global.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// x for quant block `blk`: token (nt * 8 + g), k = 64 * blk + 16t .. + 16, as 8 words of 2 values (zeros past M).
template <typename T, int NT>
__device__ __forceinline__ void load_x_fragments(const T* __restrict__ x, int M, int K, int blk, int g, int t,
                                                 uint32_t (&xb)[NT][8]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tok = nt * 8 + g;
    if (tok < M) {
      load_x_block(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(tok) * K + 64 * blk + 16 * t), xb[nt]);
    } else {
#pragma unroll
      for (int w = 0; w < 8; ++w) xb[nt][w] = 0u;
    }
  }
}

// Register cap: ncu (H200, 1 row) showed 92 registers limiting the SM to 20 warps (24% achieved occupancy)
// with the L1 pipe, not DRAM, the busiest unit. The one-token-tile kernel is capped at 80 registers
// (8 bytes spilled; at 64 it spilled 104 bytes into local memory, which goes through that same L1 pipe).
template <int WARPS, int NT>
struct MinBlocks {
  static constexpr int value = NT == 1 ? 65536 / (80 * WARPS * 32) : 1;
};

template <typename T, int NT, int WARPS, int PREFETCH>
__global__ void __launch_bounds__(WARPS * 32, (MinBlocks<WARPS, NT>::value)) nf4_mma_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out,
    float* __restrict__ partial, int M, int N, int K, int blocks_per_split) {
  const char* lut = stage_code_table(table);

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tile = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int row_lo = row_tile * 16 + g;
  const int row_hi = row_lo + 8;
  const bool ok_lo = row_lo < N;
  const bool ok_hi = row_hi < N;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);

  const uint8_t* codes_lo = codes + static_cast<int64_t>(row_lo) * (K / 2) + 8 * t;
  const uint8_t* codes_hi = codes + static_cast<int64_t>(row_hi) * (K / 2) + 8 * t;
  const float* absmax_lo = absmax + static_cast<int64_t>(row_lo) * num_blocks;
  const float* absmax_hi = absmax + static_cast<int64_t>(row_hi) * num_blocks;

  float acc[NT][4] = {};

  BlockCodes ring[PREFETCH];
#pragma unroll
  for (int i = 0; i < PREFETCH; ++i) {
    const int blk = first + i;
    const bool ok = blk < last;
    ring[i].row_lo = load_codes(codes_lo + 32 * blk, ok && ok_lo);
    ring[i].row_hi = load_codes(codes_hi + 32 * blk, ok && ok_hi);
    ring[i].scale_lo = (ok && ok_lo) ? absmax_lo[blk] : 0.f;
    ring[i].scale_hi = (ok && ok_hi) ? absmax_hi[blk] : 0.f;
  }

  for (int base = first; base < last; base += PREFETCH) {
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
      const int blk = base + i;
      if (blk >= last) break;  // warp-uniform
      const BlockCodes cur = ring[i];
      // Refill this ring slot with the block PREFETCH ahead before computing on the current one.
      const int ahead = blk + PREFETCH;
      const bool ok = ahead < last;
      ring[i].row_lo = load_codes(codes_lo + 32 * ahead, ok && ok_lo);
      ring[i].row_hi = load_codes(codes_hi + 32 * ahead, ok && ok_hi);
      ring[i].scale_lo = (ok && ok_lo) ? absmax_lo[ahead] : 0.f;
      ring[i].scale_hi = (ok && ok_hi) ? absmax_hi[ahead] : 0.f;

      uint32_t xb[NT][8];
      load_x_fragments<T, NT>(x, M, K, blk, g, t, xb);

#pragma unroll
      for (int half = 0; half < 2; ++half) {  // code word `half` holds bytes 4 * half .. + 4: k-steps 2*half, +1
        const uint32_t w_lo = half ? cur.row_lo.y : cur.row_lo.x;
        const uint32_t w_hi = half ? cur.row_hi.y : cur.row_hi.x;
        const uint32_t lo_even = (w_lo >> 2) & 0x3C3C3C3Cu, lo_odd = (w_lo << 2) & 0x3C3C3C3Cu;
        const uint32_t hi_even = (w_hi >> 2) & 0x3C3C3C3Cu, hi_odd = (w_hi << 2) & 0x3C3C3C3Cu;
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * half + jj;  // k-step: code bytes 2j (columns 2t, 2t+1), 2j + 1 (2t+8, 2t+9)
          const uint32_t a0 = dequant_pair<T>(lut, lo_even, lo_odd, 2 * jj, cur.scale_lo);
          const uint32_t a1 = dequant_pair<T>(lut, hi_even, hi_odd, 2 * jj, cur.scale_hi);
          const uint32_t a2 = dequant_pair<T>(lut, lo_even, lo_odd, 2 * jj + 1, cur.scale_lo);
          const uint32_t a3 = dequant_pair<T>(lut, hi_even, hi_odd, 2 * jj + 1, cur.scale_hi);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) Ops<T>::mma(acc[nt], a0, a1, a2, a3, xb[nt][2 * j], xb[nt][2 * j + 1]);
        }
      }
    }
  }

  store_c_fragments<T, NT>(acc, row_lo, t, 0, M, N, bias, out, partial);
}
