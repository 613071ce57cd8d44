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
// This translation unit holds the kernels of 1-64 rows and the Python bindings of the whole extension; the wide and
// wgmma kernels build beside it in nf4_wide.cu and nf4_wgmma.cu (ninja compiles the three at once), all three on the
// torch-side helpers of nf4_launch.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "nf4_device.cuh"

namespace {

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

// The same MMA mapping over the forward-only tile layout (server/kernels/nf4/nf4_layout.py, TiledNF4): for row tile r
// (rows 16r .. 16r + 15, zero-padded) and quant block b, 512 code bytes in lane order (lane 4g + t: row 16r + g's
// bytes [32b + 8t, +8), then row 16r + g + 8's) and 8 float2 scales (row g, row g + 8). A warp streams contiguous
// memory: one 16-byte code load (4 L1 wavefronts a warp, against 16 for two 8-byte loads over 8 rows each) and one
// 8-byte scale load (1 wavefront, against 16 for two scattered 4-byte loads) per block; with RT = 2 a warp owns two
// tiles and the x fragments it loads serve both.
template <int WARPS, int NT, int RT>
struct TileMinBlocks {
  static constexpr int value = (NT == 1 && RT == 1) ? 65536 / (64 * WARPS * 32) : 1;
};

// The code ring's depth: 2 at the 64-register cap of one token tile and one row tile (x one block ahead takes the
// room of the other two slots), 4 otherwise.
__host__ __device__ constexpr int tile_prefetch(int nt, int rt) { return nt == 1 && rt == 1 ? 2 : 4; }

template <typename T, int NT, int RT, int WARPS, int PREFETCH>
__global__ void __launch_bounds__(WARPS * 32, (TileMinBlocks<WARPS, NT, RT>::value)) nf4_tile_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out,
    float* __restrict__ partial, int M, int N, int K, int blocks_per_split) {
  const char* lut = stage_code_table(table);

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * RT;
  const int row_tiles = (N + 15) / 16;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);

  // Every load in the loop reads valid memory, so none is predicated and nothing is zeroed: a warp past the last
  // row tile leaves, a second tile past it re-reads the first (its rows are never stored), blocks past the split
  // are clamped to its last one (refills that are never used), and tokens past M re-read token M - 1 (their
  // columns are never stored). Offsets are 32-bit from per-lane bases computed once.
  if (tile0 >= row_tiles) return;  // after the only __syncthreads
  const uint4* x_at[NT];  // token nt * 8 + g (clamped), its 16 k of block 0 for quad lane t: 2 uint4 a block
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    x_at[nt] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(nt * 8 + g, M - 1)) * K) + 2 * t;

  float acc[RT][NT][4] = {};
  // x one block ahead, two buffers, at one token tile: block blk's x in buffer (blk - first) % 2 (as
  // nf4_gemv_kernel). Measured slower at two token tiles (H100, 12-16 rows: 8B gate_up 49.3 us against 45.0, down
  // 25.3 against 23.9); from four it would take 64-128 registers more (246 at eight): loaded in its step.
  constexpr bool AHEAD = NT == 1;
  static_assert(!AHEAD || PREFETCH % 2 == 0, "x's two buffers take block first + s's x from buffer s % 2");

  TileRing<RT, PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  wait_for_prior_grid();  // codes in flight; x is the kernel ahead's output
  uint32_t xs[AHEAD ? 2 : 1][NT][8];
  if constexpr (AHEAD) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) load_x_block(x_at[nt] + 8 * min(first, num_blocks - 1), xs[0][nt]);
  }
  for (int base = first; base < last; base += PREFETCH) {
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
      const int blk = base + i;
      if (blk >= last) break;  // warp-uniform
      uint4 cur_codes[RT];
      float2 cur_scales[RT];
      ring.take(i, blk, last, cur_codes, cur_scales);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (AHEAD) {
          load_x_block(x_at[nt] + 8 * min(blk + 1, last - 1), xs[(i + 1) % 2][nt]);
        } else {
          load_x_block(x_at[nt] + 8 * blk, xs[0][nt]);
        }
      }
      const uint32_t(&xb)[NT][8] = xs[AHEAD ? i % 2 : 0];

#pragma unroll
      for (int r = 0; r < RT; ++r) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          uint32_t a[2][4];
          a_fragments<T>(lut, cur_codes[r], cur_scales[r], half, a);
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            const int j = 2 * half + jj;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
              Ops<T>::mma(acc[r][nt], a[jj][0], a[jj][1], a[jj][2], a[jj][3], xb[nt][2 * j], xb[nt][2 * j + 1]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RT; ++r) store_c_fragments<T, NT>(acc[r], (tile0 + r) * 16 + g, t, 0, M, N, bias, out, partial);
}

// One to eight rows (batch-1 decode): a block of WARPS warps owns one 16-row tile and splits its K among its warps
// (warp w takes blocks [w * per_warp, (w + 1) * per_warp), as split w of nf4_tile with split_k = WARPS would); their
// fp32 sums meet in shared memory and are added in warp order, so the block that computed a row stores it: no fp32
// partials and no second kernel. At one row the tile kernel's split-K sum kernel and its partials cost 1.1-3.9 us a
// call on the 8B shapes (H200: nf4_tile against bench.nf4_sol's probe of the same loop without them, -nf4-sol-s20).
template <typename T, int WARPS, int PREFETCH>
__global__ void __launch_bounds__(WARPS * 32, 1024 / (WARPS * 32)) nf4_gemv_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K) {
  static_assert(PREFETCH % 2 == 0, "x's two buffers take block first + s's x from buffer s % 2");
  __shared__ float sums[WARPS][16][8];  // [warp][row of the tile][token]
  const char* lut = stage_code_table(table);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile = blockIdx.x;
  const int row_tiles = (N + 15) / 16;
  const int num_blocks = K / 64;
  const int per_warp = (num_blocks + WARPS - 1) / WARPS;
  const int first = min(warp * per_warp, num_blocks);
  const int last = min(first + per_warp, num_blocks);
  // token g (tokens past M re-read token M - 1: their columns are never stored), its 16 k of block 0 for lane t
  const uint4* x_at = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(g, M - 1)) * K) + 2 * t;

  float acc[4] = {};
  if (first < last) {  // warp-uniform: a warp past the last block (WARPS > blocks) adds zeros
    TileRing<1, PREFETCH> ring(tile_codes, tile_scales, tile, row_tiles, num_blocks, lane, first, last);
    wait_for_prior_grid();  // codes in flight; x is the kernel ahead's output
    // x one block ahead, two buffers: block blk's x is in buffer (blk - first) % 2 (its loads had waited at every
    // block, between the block's first instruction and its first MMA: H100, 8B down at one row 20.5 -> 17.1 us
    // when nf4_gemv_pairs took the same change, -kernels-s34-xnext.json)
    uint32_t xs[2][8];
    load_x_block(x_at + 8 * first, xs[0]);
    for (int base = first; base < last; base += PREFETCH) {
#pragma unroll
      for (int i = 0; i < PREFETCH; ++i) {
        const int blk = base + i;
        if (blk >= last) break;  // warp-uniform
        uint4 cur_codes[1];
        float2 cur_scales[1];
        ring.take(i, blk, last, cur_codes, cur_scales);
        load_x_block(x_at + 8 * min(blk + 1, last - 1), xs[(i + 1) % 2]);
        mma_block<T>(lut, cur_codes[0], cur_scales[0], xs[i % 2], acc);
      }
    }
  } else {
    wait_for_prior_grid();  // no x to read, but this warp's threads store outputs below
  }
  // C fragment: acc[0..1] = (row g, tokens 2t, 2t + 1), acc[2..3] = (row g + 8, same tokens)
  sums[warp][g][2 * t] = acc[0];
  sums[warp][g][2 * t + 1] = acc[1];
  sums[warp][g + 8][2 * t] = acc[2];
  sums[warp][g + 8][2 * t + 1] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8; i += WARPS * 32) {
    const int r = i >> 3, tok = i & 7;
    const int row = tile * 16 + r;
    if (tok >= M || row >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += sums[w][r][tok];
    store_output<T>(v, tok, row, M, N, bias, out, nullptr);
  }
}

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

}  // namespace

#include "nf4_pairs.cuh"

#include "nf4_launch.cuh"


template <typename T, int NT>
void launch(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& absmax,
            const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
            int64_t split_k, int64_t warps) {
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const int row_tiles = (N + 15) / 16;
  run_split<T>(x, bias, out, split_k,
               [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                   int blocks_per_split) {
#define LORAPLEX_LAUNCH(W)                                                                                 \
  nf4_mma_kernel<T, NT, W, 4><<<dim3((row_tiles + W - 1) / W, splits), W * 32, 0, stream>>>(                \
      reinterpret_cast<const T*>(x.data_ptr()), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),       \
      table.data_ptr<float>(), bias_ptr, out_ptr, partial, M, N, K, blocks_per_split)
    if (warps == 2) {
      LORAPLEX_LAUNCH(2);
    } else {
      LORAPLEX_LAUNCH(4);
    }
#undef LORAPLEX_LAUNCH
  });
}

template <typename T, int NT, int RT, int W>
torch::Tensor launch_tile(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                          const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                          int64_t split_k, bool pdl, bool defer_sum) {
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const int warps_needed = ((N + 15) / 16 + RT - 1) / RT;
  const int groups = (warps_needed + W - 1) / W;
  return run_split<T>(x, bias, out, split_k,
                      [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                          int blocks_per_split) {
    constexpr auto kernel = nf4_tile_kernel<T, NT, RT, W, tile_prefetch(NT, RT)>;
    launch_kernel(kernel, dim3(groups, splits), dim3(W * 32), 0, stream, pdl,
                  reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(tile_codes.data_ptr()),
                  reinterpret_cast<const float2*>(tile_scales.data_ptr()),
                  static_cast<const float*>(table.data_ptr<float>()), bias_ptr, out_ptr, partial, M, N, K,
                  blocks_per_split);
  }, pdl, defer_sum);
}

// The instances built (compile time is paid on the GPU host at first use): (token tiles, row tiles a warp, warps).
// 1-8 rows: (1, 1, 2|4); 9-16: (2, 1|2, 4); 17-32: (4, 1|2, 4); 33-64: (8, 1, 4).
template <typename T>
torch::Tensor dispatch_tile(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                            const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                            int64_t split_k, int64_t warps, int64_t rows_per_warp, bool pdl, bool defer_sum) {
  const int64_t M = x.size(0);
  const bool two = rows_per_warp == 2;
#define LORAPLEX_TILE(NT, RT, W) \
  launch_tile<T, NT, RT, W>(x, tile_codes, tile_scales, table, bias, out, split_k, pdl, defer_sum)
  if (M <= 8) return warps == 2 ? LORAPLEX_TILE(1, 1, 2) : LORAPLEX_TILE(1, 1, 4);
  if (M <= 16) return two ? LORAPLEX_TILE(2, 2, 4) : LORAPLEX_TILE(2, 1, 4);
  if (M <= 32) return two ? LORAPLEX_TILE(4, 2, 4) : LORAPLEX_TILE(4, 1, 4);
  return LORAPLEX_TILE(8, 1, 4);
#undef LORAPLEX_TILE
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout; M <= 64, K % 64 == 0. With defer_sum and K split, returns
// the unsummed fp32 partials [splits, M, N] instead (run_split); else None.
torch::Tensor nf4_tile(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                       c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t warps,
                       int64_t rows_per_warp, bool pdl, bool defer_sum) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 64, "nf4_tile takes 1..64 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  check_tile_layout(x, tile_codes, tile_scales, out);
  return run_for_dtype(x, [&](auto dtype_tag) {
    return dispatch_tile<decltype(dtype_tag)>(x, tile_codes, tile_scales, table, bias, out, split_k, warps,
                                              rows_per_warp, pdl, defer_sum);
  });
}

// Resident blocks per SM of the tile kernel instance nf4_tile would launch (bf16 x).
int64_t nf4_tile_blocks_per_sm(int64_t rows, int64_t warps, int64_t rows_per_warp) {
  int blocks = 0;
  const bool two = rows_per_warp == 2;
  const int threads = static_cast<int>(rows <= 8 ? warps : 4) * 32;
#define LORAPLEX_OCC_TILE(NT, RT, W)                                                                               \
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(                                                                    \
      &blocks, nf4_tile_kernel<__nv_bfloat16, NT, RT, W, tile_prefetch(NT, RT)>, threads, 0)
  if (rows <= 8) {
    if (warps == 2) LORAPLEX_OCC_TILE(1, 1, 2); else LORAPLEX_OCC_TILE(1, 1, 4);
  } else if (rows <= 16) {
    if (two) LORAPLEX_OCC_TILE(2, 2, 4); else LORAPLEX_OCC_TILE(2, 1, 4);
  } else if (rows <= 32) {
    if (two) LORAPLEX_OCC_TILE(4, 2, 4); else LORAPLEX_OCC_TILE(4, 1, 4);
  } else {
    LORAPLEX_OCC_TILE(8, 1, 4);
  }
#undef LORAPLEX_OCC_TILE
  return blocks;
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout by nf4_gemv_kernel; 1 <= M <= 8, warps 2, 4, 8 or 16.
torch::Tensor nf4_gemv(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                       c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "nf4_gemv takes 1..8 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  check_tile_layout(x, tile_codes, tile_scales, out);
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const dim3 grid((N + 15) / 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* codes = reinterpret_cast<const uint4*>(tile_codes.data_ptr());
  const auto* scales = reinterpret_cast<const float2*>(tile_scales.data_ptr());
  const float* table_ptr = table.data_ptr<float>();
  auto run = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    const T* x_ptr = reinterpret_cast<const T*>(x.data_ptr());
    const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    T* out_ptr = reinterpret_cast<T*>(out.data_ptr());
#define LORAPLEX_GEMV(W)                                                                                      \
  launch_kernel(nf4_gemv_kernel<T, W, 2>, grid, dim3(W * 32), 0, stream, programmatic_launch(), x_ptr, codes, \
                scales, table_ptr, bias_ptr, out_ptr, M, N, K)
    switch (warps) {
      case 2: LORAPLEX_GEMV(2); break;
      case 4: LORAPLEX_GEMV(4); break;
      case 8: LORAPLEX_GEMV(8); break;
      case 16: LORAPLEX_GEMV(16); break;
      default: TORCH_CHECK(false, "nf4_gemv takes 2, 4, 8 or 16 warps, got ", warps);
    }
#undef LORAPLEX_GEMV
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  run_for_dtype(x, run);
  return out;
}

// Blocks an SM holds of nf4_gemv_pairs_kernel<T, kPairsWarps, NT, kPairsPrefetch> on the current device, its
// dynamic shared memory allowed first (the device must give a block 128 KB for one token tile: sm_80, sm_90, not
// sm_86/89; 192 KB for two: sm_90). Once per instance and device.
template <typename T, int NT>
int pairs_blocks_per_sm() {
  constexpr auto kernel = nf4_gemv_pairs_kernel<T, kPairsWarps, NT, kPairsPrefetch>;
  constexpr int bytes = pairs_smem_bytes(kPairsWarps, NT);
  static int blocks[64] = {};  // 0: not asked yet
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && blocks[device] > 0) return blocks[device];
  int most = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(most >= bytes, "nf4_gemv_pairs needs ", bytes, " bytes of shared memory a block at ", 8 * NT,
              " rows; this GPU allows ", most);
  allow_dynamic_smem<kernel>(bytes);
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kPairsWarps * 32, bytes));
  if (device < 64) blocks[device] = n;
  return n;
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout by nf4_gemv_pairs_kernel: 1 <= M <= 16, blocks of 32 warps
// in groups of `group_warps` (4, 8, 16 or 32) warps a row tile, as many blocks as the SMs hold at once or as the row
// tiles need, whichever is fewer. The same bits as nf4_tile(..., split_k = group_warps) (and nf4_gemv at that many
// warps, up to 8 rows).
torch::Tensor nf4_gemv_pairs(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales,
                             torch::Tensor table, c10::optional<torch::Tensor> bias, torch::Tensor out,
                             int64_t group_warps, bool one_wait) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 16, "nf4_gemv_pairs takes 1..16 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(!one_wait || x.size(0) <= 8, "one_wait takes 1..8 rows (one token tile), got ", x.size(0));
  TORCH_CHECK(group_warps == 4 || group_warps == 8 || group_warps == 16 || group_warps == 32,
              "group_warps must be 4, 8, 16 or 32, got ", group_warps);
  check_tile_layout(x, tile_codes, tile_scales, out);
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const int row_tiles = (N + 15) / 16, groups = kPairsWarps / static_cast<int>(group_warps);
  const int num_sms = current_device_sms();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    auto launch = [&](auto token_tiles) {
      constexpr int NT = decltype(token_tiles)::value;
      const int resident = num_sms * pairs_blocks_per_sm<T, NT>();
      const int blocks = std::max(1, std::min(resident, (row_tiles + groups - 1) / groups));
      auto go = [&](auto one_wait_tag) {
        constexpr bool ONE_WAIT = decltype(one_wait_tag)::value;
        constexpr auto kernel = nf4_gemv_pairs_kernel<T, kPairsWarps, NT, kPairsPrefetch, ONE_WAIT>;
        if constexpr (ONE_WAIT) allow_dynamic_smem<kernel>(pairs_smem_bytes(kPairsWarps, NT));
        launch_kernel(kernel, dim3(blocks), dim3(kPairsWarps * 32), pairs_smem_bytes(kPairsWarps, NT), stream,
                      programmatic_launch(), reinterpret_cast<const T*>(x.data_ptr()),
                      reinterpret_cast<const uint4*>(tile_codes.data_ptr()),
                      reinterpret_cast<const float2*>(tile_scales.data_ptr()), table.data_ptr<float>(),
                      bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
                      reinterpret_cast<T*>(out.data_ptr()), M, N, K, static_cast<int>(group_warps));
      };
      // one_wait (one token tile): nf4_gemv_pairs_kernel's ONE_WAIT step (cuda_nf4.one_wait_for)
      if constexpr (NT == 1) {
        if (one_wait) {
          go(std::true_type());
          return;
        }
      }
      go(std::false_type());
    };
    if (M <= 8) launch(std::integral_constant<int, 1>());
    else launch(std::integral_constant<int, 2>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  run_for_dtype(x, run);
  return out;
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout by nf4_gemm_kernel; any M, K % 64 == 0. With defer_sum
// and K split, returns the unsummed fp32 partials [splits, M, N] instead (run_split); else None.
torch::Tensor nf4_gemm(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                       c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, bool defer_sum) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2 && x.size(0) >= 1, "x must be a contiguous CUDA [M, K]");
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  check_tile_layout(x, tile_codes, tile_scales, out);
  const int M = x.size(0), N = out.size(1);
  const int row_groups = ((N + 15) / 16 + 2 * GEMM_NT - 1) / (2 * GEMM_NT);
  const int token_groups = (M + 2 * GEMM_MT * 16 - 1) / (2 * GEMM_MT * 16);
  auto run = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    return run_split<T>(x, bias, out, split_k,
                        [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                            int blocks_per_split) {
      launch_tile_layout(nf4_gemm_kernel<T>, dim3(row_groups, splits, token_groups), GEMM_WARPS * 32, 0, stream, x,
                         tile_codes, tile_scales, table, bias_ptr, out_ptr, partial, N, blocks_per_split);
    }, programmatic_launch(), defer_sum);
  };
  return run_for_dtype(x, run);
}

template <typename T>
void dispatch_tiles(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& absmax,
                    const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                    int64_t split_k, int64_t warps) {
  const int64_t M = x.size(0);
  if (M <= 8) launch<T, 1>(x, codes, absmax, table, bias, out, split_k, warps);
  else if (M <= 16) launch<T, 2>(x, codes, absmax, table, bias, out, split_k, warps);
  else if (M <= 32) launch<T, 4>(x, codes, absmax, table, bias, out, split_k, warps);
  else launch<T, 8>(x, codes, absmax, table, bias, out, split_k, warps);
}

// out[M, N] = x[M, K] @ dequant(codes, absmax)^T (+ bias); M <= 64, K % 64 == 0, all contiguous on one GPU.
void nf4_mma(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax, torch::Tensor table,
             c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 64, "nf4_mma takes 1..64 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type(), "out must be contiguous, x's dtype");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && absmax.scalar_type() == torch::kFloat32, "codes u8, absmax f32");
  run_for_dtype(x, [&](auto dtype_tag) {
    dispatch_tiles<decltype(dtype_tag)>(x, codes, absmax, table, bias, out, split_k, warps);
  });
}

// Resident blocks per SM of the kernel instance nf4_mma would launch for `rows` and `warps` (bf16 x).
int64_t nf4_mma_blocks_per_sm(int64_t rows, int64_t warps) {
  int blocks = 0;
  const int threads = static_cast<int>(warps) * 32;
#define LORAPLEX_OCC(NT)                                                                                   \
  if (warps == 2) {                                                                                        \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_mma_kernel<__nv_bfloat16, NT, 2, 4>, threads, 0); \
  } else {                                                                                                 \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_mma_kernel<__nv_bfloat16, NT, 4, 4>, threads, 0); \
  }
  if (rows <= 8) { LORAPLEX_OCC(1) } else if (rows <= 16) { LORAPLEX_OCC(2) } else if (rows <= 32) { LORAPLEX_OCC(4) } else { LORAPLEX_OCC(8) }
#undef LORAPLEX_OCC
  return blocks;
}

// Defined in the extension's other translation units (nf4_wide.cu, nf4_wgmma.cu), which build in parallel.
torch::Tensor nf4_wide(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                       c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t token_tiles,
                       int64_t rows_per_warp, bool defer_sum);
int64_t nf4_wide_blocks_per_sm(int64_t token_tiles, int64_t rows_per_warp);
torch::Tensor nf4_wgmma(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                        c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t block_tokens,
                        int64_t stage_blocks, int64_t blocks_per_sm, int64_t block_warps, bool one_wait,
                        int64_t resident_warpgroups, bool pairs, bool defer_sum);
torch::Tensor nf4_wgmma_bulk_x(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales,
                               torch::Tensor table, c10::optional<torch::Tensor> bias, torch::Tensor out,
                               int64_t split_k, int64_t block_tokens, int64_t block_warps, bool cluster_sum,
                               bool defer_sum);
bool nf4_wgmma_built();
int64_t nf4_wgmma_cluster_occupancy(int64_t splits);

// Whether the NF4 kernels' launches are programmatically dependent (nf4_launch.cuh's programmatic_launch).
void set_programmatic_launch(bool on) { programmatic_launch() = on; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_mma", &nf4_mma, "NF4 x 16-bit matmul on tensor cores, M <= 64");
  m.def("nf4_mma_blocks_per_sm", &nf4_mma_blocks_per_sm, "resident blocks per SM of the kernel for (rows, warps)");
  m.def("nf4_tile", &nf4_tile, "NF4 x 16-bit matmul on tensor cores from the tile layout, M <= 64");
  m.def("nf4_tile_blocks_per_sm", &nf4_tile_blocks_per_sm, "resident blocks per SM of the tile kernel");
  m.def("nf4_gemv", &nf4_gemv, "NF4 x 16-bit matmul from the tile layout, 1-8 rows, K split among a block's warps");
  m.def("nf4_gemv_pairs", &nf4_gemv_pairs, "NF4 x 16-bit matmul from the tile layout, 1-16 rows, byte-pair table");
  m.def("nf4_gemm", &nf4_gemm, "NF4 x 16-bit GEMM from the tile layout, x as the MMA's A operand, any M");
  m.def("nf4_wgmma", &nf4_wgmma, "NF4 x 16-bit GEMM from the tile layout on warpgroup MMA (sm_90a)");
  m.def("nf4_wgmma_bulk_x", &nf4_wgmma_bulk_x, "nf4_wgmma's 128- or 64-token block with x brought by the TMA unit (sm_90a)");
  m.def("nf4_wgmma_built", &nf4_wgmma_built, "whether this build has the wgmma kernels (sm_90a)");
  m.def("nf4_wide", &nf4_wide, "NF4 x 16-bit matmul on tensor cores from the tile layout, x through shared memory");
  m.def("nf4_wide_blocks_per_sm", &nf4_wide_blocks_per_sm, "resident blocks per SM of a wide instance");
  m.def("nf4_wgmma_cluster_occupancy", &nf4_wgmma_cluster_occupancy,
        "clusters of `splits` cluster-summing bulk_x blocks the GPU holds at once (sm_90a)");
  m.def("set_programmatic_launch", &set_programmatic_launch,
        "launch the NF4 kernels programmatically dependent on the kernel ahead (sm_90+)");
}
