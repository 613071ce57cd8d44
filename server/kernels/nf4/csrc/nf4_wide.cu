// The wide kernel (16-256 rows on every sm_80+ GPU; below Hopper's wgmma range elsewhere): x staged in shared
// memory for a block's warps, the tile layout's MMA mapping (nf4_mma.cuh's header says how), and its launches.
// Its own translation unit so that the extension's sources build in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "nf4_device.cuh"

namespace {

// Wide batches (16-256 rows): the tile layout's MMA mapping with x staged once a block in shared memory, where the
// tile kernel (nf4_tile.cuh) has every warp load its own x fragments from L1 (8 cache lines an instruction; the L1 pipe,
// not DRAM, bounded it at 32 rows). The block's warps (one or two 16-row tiles each) share one copy of x per quant
// block: TOKENS rows of 64 values (128 bytes), brought in by cp.async STAGES - 1 blocks ahead. 16-byte chunk c of
// row r sits at chunk c ^ (r & 7), so a quarter warp's LDS.128 (rows g and g + 1, chunks 2t and 2t + 1) and the
// 8 threads of a staging wavefront (one row's 8 chunks) each touch 32 distinct banks. A warp dequantizes its
// 16 x 64 weights of a block once into 16 A fragments (per row tile) and runs them against every token tile, so
// the dequantization cost is shared by TOKENS tokens. More tokens than TOKENS: grid z walks token groups.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <int NT, int STAGES>
struct WideSmem {
  static constexpr int stage_bytes = NT * 8 * 128;
  static constexpr int bytes = STAGES * stage_bytes;
};

template <typename T, int NT, int RT, int WARPS, int STAGES, int PREFETCH>
__global__ void __launch_bounds__(WARPS * 32) nf4_wide_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out,
    float* __restrict__ partial, int M, int N, int K, int blocks_per_split) {
  constexpr int TOKENS = NT * 8;
  constexpr int THREADS = WARPS * 32;
  constexpr int STAGE_BYTES = WideSmem<NT, STAGES>::stage_bytes;
  extern __shared__ __align__(128) uint8_t x_stages[];
  const char* lut = stage_code_table(table);

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tiles = (N + 15) / 16;
  const int tile0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * RT;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  const int tok0 = blockIdx.z * TOKENS;

  // Every warp stays to the end (the block's barriers): token rows past M re-read row M - 1 and are never stored.
  const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(x_stages));
  wait_for_prior_grid();  // x is the kernel ahead's output

  // Stage x of quant block `blk` into buffer `stage`: TOKENS rows of 8 chunks, one 16-byte cp.async each.
  auto stage_x = [&](int blk, int stage) {
    static_assert(TOKENS * 8 % THREADS == 0, "whole staging rounds");
#pragma unroll
    for (int k = 0; k < TOKENS * 8 / THREADS; ++k) {
      const int c = threadIdx.x + k * THREADS;
      const int row = c >> 3, chunk = c & 7;
      const T* src = x + static_cast<int64_t>(min(tok0 + row, M - 1)) * K + 64 * blk + 8 * chunk;
      cp_async16(smem + stage * STAGE_BYTES + row * 128 + ((chunk ^ (row & 7)) << 4), src);
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (first + s < last) stage_x(first + s, s);
    cp_async_commit();  // one group per block, empty or not, so that wait_group counts blocks
  }

  float acc[RT][NT][4] = {};

  // Codes and scales run PREFETCH blocks ahead (one block ahead left DRAM idle at 16-32 rows).
  TileRing<RT, PREFETCH> ring(tile_codes, tile_scales, tile0, row_tiles, num_blocks, lane, first, last);
  for (int base = first; base < last; base += PREFETCH) {
#pragma unroll
    for (int p = 0; p < PREFETCH; ++p) {
      const int blk = base + p;
      if (blk >= last) break;  // the same for every thread of the block: the barrier below stays uniform
      const int i = blk - first;
      uint4 cur_codes[RT];
      float2 cur_scales[RT];
      ring.take(p, blk, last, cur_codes, cur_scales);
      uint32_t af[RT][2][2][4];  // A fragments of this block: [tile][half][k-step of the half][4 registers]
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int half = 0; half < 2; ++half) a_fragments<T>(lut, cur_codes[r], cur_scales[r], half, af[r][half]);
      cp_async_wait<STAGES - 2>();  // this block's x has landed (for this thread's copies) ...
      __syncthreads();              // ... and everyone's; the buffer refilled below was last read a block ago
      if (blk + STAGES - 1 < last) stage_x(blk + STAGES - 1, (i + STAGES - 1) % STAGES);
      cp_async_commit();
      const uint8_t* stage = x_stages + (i % STAGES) * STAGE_BYTES;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint8_t* row = stage + (nt * 8 + g) * 128;  // (nt * 8 + g) & 7 == g
        const uint4 v0 = *reinterpret_cast<const uint4*>(row + (((2 * t) ^ g) << 4));
        const uint4 v1 = *reinterpret_cast<const uint4*>(row + (((2 * t + 1) ^ g) << 4));
        const uint32_t xb[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < RT; ++r)
            Ops<T>::mma(acc[r][nt], af[r][j / 2][j % 2][0], af[r][j / 2][j % 2][1], af[r][j / 2][j % 2][2],
                        af[r][j / 2][j % 2][3], xb[2 * j], xb[2 * j + 1]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < RT; ++r) {
    if (tile0 + r < row_tiles)
      store_c_fragments<T, NT>(acc[r], (tile0 + r) * 16 + g, t, tok0, M, N, bias, out, partial);
  }
}

}  // namespace

#include "nf4_launch.cuh"

// Wide instances (token tiles of 8, row tiles a warp): NT 2, 4, 8 or 16 (16 to 128 rows a pass), RT 1 or 2; four
// warps a block, three x buffers. More rows than a pass holds: grid z takes the token groups.
constexpr int WIDE_WARPS = 4;
constexpr int WIDE_STAGES = 3;
template <int NT, int RT>
struct WidePrefetch {  // code blocks in flight: 4, or 2 where the accumulators already take most registers
  static constexpr int value = NT * RT >= 16 ? 2 : 4;
};

template <typename T, int NT, int RT>
torch::Tensor launch_wide(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                          const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                          int64_t split_k, bool defer_sum) {
  const int M = x.size(0), N = out.size(1);
  const int warps_needed = ((N + 15) / 16 + RT - 1) / RT;
  const int row_groups = (warps_needed + WIDE_WARPS - 1) / WIDE_WARPS, token_groups = (M + NT * 8 - 1) / (NT * 8);
  constexpr int smem = WideSmem<NT, WIDE_STAGES>::bytes;
  constexpr auto kernel = nf4_wide_kernel<T, NT, RT, WIDE_WARPS, WIDE_STAGES, WidePrefetch<NT, RT>::value>;
  allow_dynamic_smem<kernel>(smem);
  return run_split<T>(x, bias, out, split_k,
                      [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                          int blocks_per_split) {
    launch_tile_layout(kernel, dim3(row_groups, splits, token_groups), WIDE_WARPS * 32, smem, stream, x, tile_codes,
                       tile_scales, table, bias_ptr, out_ptr, partial, N, blocks_per_split);
  }, programmatic_launch(), defer_sum);
}

template <typename T>
torch::Tensor dispatch_wide(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                            const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                            int64_t split_k, int64_t token_tiles, int64_t rows_per_warp, bool defer_sum) {
  const bool two = rows_per_warp == 2;
#define LORAPLEX_WIDE(NT, RT) launch_wide<T, NT, RT>(x, tile_codes, tile_scales, table, bias, out, split_k, defer_sum)
  if (token_tiles == 2) return two ? LORAPLEX_WIDE(2, 2) : LORAPLEX_WIDE(2, 1);
  if (token_tiles == 4) return two ? LORAPLEX_WIDE(4, 2) : LORAPLEX_WIDE(4, 1);
  if (token_tiles == 8) return two ? LORAPLEX_WIDE(8, 2) : LORAPLEX_WIDE(8, 1);
  return two ? LORAPLEX_WIDE(16, 2) : LORAPLEX_WIDE(16, 1);
#undef LORAPLEX_WIDE
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout, x staged in shared memory; any M, K % 64 == 0. With
// defer_sum and K split, returns the unsummed fp32 partials [splits, M, N] instead (run_split); else None.
torch::Tensor nf4_wide(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                       c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t token_tiles,
                       int64_t rows_per_warp, bool defer_sum) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2 && x.size(0) >= 1, "x must be a contiguous CUDA [M, K]");
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(token_tiles == 2 || token_tiles == 4 || token_tiles == 8 || token_tiles == 16,
              "token_tiles must be 2, 4, 8 or 16");
  check_tile_layout(x, tile_codes, tile_scales, out);
  return run_for_dtype(x, [&](auto dtype_tag) {
    return dispatch_wide<decltype(dtype_tag)>(x, tile_codes, tile_scales, table, bias, out, split_k, token_tiles,
                                              rows_per_warp, defer_sum);
  });
}

// Resident blocks per SM of a wide instance (bf16 x).
int64_t nf4_wide_blocks_per_sm(int64_t token_tiles, int64_t rows_per_warp) {
  int blocks = 0;
#define LORAPLEX_OCC_WIDE(NT, RT)                                                                          \
  {                                                                                                        \
    constexpr auto kernel =                                                                                \
        nf4_wide_kernel<__nv_bfloat16, NT, RT, WIDE_WARPS, WIDE_STAGES, WidePrefetch<NT, RT>::value>;        \
    constexpr int smem = WideSmem<NT, WIDE_STAGES>::bytes;                                                 \
    allow_dynamic_smem<kernel>(smem);                                                                      \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, WIDE_WARPS * 32, smem);                 \
  }
  if (token_tiles == 2) {
    if (rows_per_warp == 2) LORAPLEX_OCC_WIDE(2, 2) else LORAPLEX_OCC_WIDE(2, 1)
  } else if (token_tiles == 4) {
    if (rows_per_warp == 2) LORAPLEX_OCC_WIDE(4, 2) else LORAPLEX_OCC_WIDE(4, 1)
  } else if (token_tiles == 8) {
    if (rows_per_warp == 2) LORAPLEX_OCC_WIDE(8, 2) else LORAPLEX_OCC_WIDE(8, 1)
  } else {
    if (rows_per_warp == 2) LORAPLEX_OCC_WIDE(16, 2) else LORAPLEX_OCC_WIDE(16, 1)
  }
#undef LORAPLEX_OCC_WIDE
  return blocks;
}
