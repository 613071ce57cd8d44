// The NF4 extension's first translation unit: the kernels of 1-64 rows and of prefill-sized batches over the tile
// layout, their launches, and the Python bindings of the whole extension; the wide and wgmma kernels build beside it
// in nf4_wide.cu and nf4_wgmma.cu (ninja compiles the three at once), all three on the torch-side helpers of
// nf4_launch.cuh.
//
// Semantics (server/kernels/nf4/nf4_ops.py): W[n, k] = round_to_T(code_table[nibble] * absmax_f[block]) in fp32,
// products summed in fp32 (mma.sync accumulates in fp32), + bias, stored as T (or fp32 split-K partials).
//
// The kernels: nf4_mma.cuh (bitsandbytes' own layout; its header says the MMA mapping the others share),
// nf4_tile.cuh (the tile layout's split-K kernel and the 1-8-row gemv), nf4_gemm.cuh (x as the MMA's A operand),
// nf4_pairs.cuh (1-8 rows from the byte-pair table).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "nf4_device.cuh"

namespace {

#include "nf4_mma.cuh"

#include "nf4_tile.cuh"

#include "nf4_gemm.cuh"

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
