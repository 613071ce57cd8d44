// The NF4 kernels of 1-64 rows over the forward-only tile layout: nf4_tile_kernel (split K, fp32 partials) and
// nf4_gemv_kernel (1-8 rows, K split among a block's warps, summed in shared memory). Included by nf4_mma.cu (inside
// its anonymous namespace, after nf4_mma.cuh, whose MMA mapping they share).
#pragma once

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
