// nf4_gemm_kernel: prefill-sized batches over the tile layout, x as the MMA's A operand. Included by nf4_mma.cu
// (inside its anonymous namespace, after nf4_tile.cuh).
#pragma once

// Prefill-sized batches, a GEMM with the roles of the kernels above swapped: x is the MMA's A operand (16 tokens a
// tile, read from global memory through L1 with the same k permutation as the weights) and the weights its B
// operand: a 16-row weight tile's A fragments (a_fragments) are two n8 B fragments, rows 0-7 (a0, a2) and rows 8-15
// (a1, a3). A warp owns GEMM_MT token tiles x GEMM_NT weight tiles (64 tokens x 32 weight rows) and dequantizes each
// weight of its tiles once a quant block; a block's four warps are 2 (tokens) x 2 (weight rows), 128 x 64. Where the
// wide kernel re-reads all of x from shared memory for every 16 weight rows (16 bytes a weight at 128 rows), a warp
// here reads 4 bytes of x a weight, for twice the dequantization. Grid: (weight-row groups of 64, splits of K, token
// groups of 128); split K as run_split does. Not in the dispatch until the H200 measures it (bench.kernels' gemm).
constexpr int GEMM_MT = 4;
constexpr int GEMM_NT = 2;
constexpr int GEMM_WARPS = 4;

template <typename T>
__global__ void __launch_bounds__(GEMM_WARPS * 32) nf4_gemm_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
  const char* lut = stage_code_table(table);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tok0 = (blockIdx.z * 2 + (warp & 1)) * GEMM_MT * 16;
  const int tile0 = (blockIdx.x * 2 + (warp >> 1)) * GEMM_NT;
  const int row_tiles = (N + 15) / 16;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  if (tile0 >= row_tiles || tok0 >= M) return;  // after the only __syncthreads

  // Token rows tok0 + 16 mt + g (A rows g) and + 8 (A rows g + 8), clamped to M - 1 (never stored), lane t's 32 bytes
  // of each quant block: uint4 `half` of them holds k-steps 2 half and 2 half + 1.
  const uint4* x_at[GEMM_MT][2];
#pragma unroll
  for (int mt = 0; mt < GEMM_MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tok = min(tok0 + 16 * mt + 8 * h + g, M - 1);
      x_at[mt][h] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(tok) * K) + 2 * t;
    }
  }

  float acc[GEMM_MT][GEMM_NT][2][4] = {};  // [token tile][weight tile][its rows 0-7 / 8-15][C fragment]
  TileRing<GEMM_NT, 2> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  wait_for_prior_grid();
  for (int base = first; base < last; base += 2) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int blk = base + i;
      if (blk >= last) break;  // warp-uniform
      uint4 cur_codes[GEMM_NT];
      float2 cur_scales[GEMM_NT];
      ring.take(i, blk, last, cur_codes, cur_scales);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint4 xr[GEMM_MT][2];
#pragma unroll
        for (int mt = 0; mt < GEMM_MT; ++mt) {
          xr[mt][0] = __ldg(x_at[mt][0] + 8 * blk + half);
          xr[mt][1] = __ldg(x_at[mt][1] + 8 * blk + half);
        }
        uint32_t w[GEMM_NT][2][4];
#pragma unroll
        for (int r = 0; r < GEMM_NT; ++r) a_fragments<T>(lut, cur_codes[r], cur_scales[r], half, w[r]);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {  // k-step 2 half + jj: words 2 jj and 2 jj + 1 of this half's uint4
#pragma unroll
          for (int mt = 0; mt < GEMM_MT; ++mt) {
            const uint32_t a0 = jj ? xr[mt][0].z : xr[mt][0].x, a2 = jj ? xr[mt][0].w : xr[mt][0].y;
            const uint32_t a1 = jj ? xr[mt][1].z : xr[mt][1].x, a3 = jj ? xr[mt][1].w : xr[mt][1].y;
#pragma unroll
            for (int r = 0; r < GEMM_NT; ++r) {
              Ops<T>::mma(acc[mt][r][0], a0, a1, a2, a3, w[r][jj][0], w[r][jj][2]);
              Ops<T>::mma(acc[mt][r][1], a0, a1, a2, a3, w[r][jj][1], w[r][jj][3]);
            }
          }
        }
      }
    }
  }

  // C fragment: acc[..][0..1] = (token g, weight rows 2t, 2t + 1 of the n8 tile), acc[..][2..3] = (token g + 8, same)
#pragma unroll
  for (int mt = 0; mt < GEMM_MT; ++mt) {
#pragma unroll
    for (int r = 0; r < GEMM_NT; ++r) {
#pragma unroll
      for (int h8 = 0; h8 < 2; ++h8) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int tok = tok0 + 16 * mt + g + (i >= 2 ? 8 : 0);
          const int row = (tile0 + r) * 16 + 8 * h8 + 2 * t + (i & 1);
          if (tok < M && row < N) store_output<T>(acc[mt][r][h8][i], tok, row, M, N, bias, out, partial);
        }
      }
    }
  }
}
