// The warpgroup-MMA kernel's launches (nf4_wgmma.cuh: 17-256 rows on Hopper) and the probe of whether this build has
// it. Its own translation unit so that the extension's sources build in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "nf4_device.cuh"
#include "nf4_wgmma.cuh"
#include "nf4_wgmma_bulk.cuh"
#include "nf4_wgmma_resident.cuh"

namespace {
__global__ void wgmma_built_kernel(int* flag) {
#ifdef LORAPLEX_WGMMA
  *flag = 1;
#else
  *flag = 0;
#endif
}
}  // namespace

#include "nf4_launch.cuh"

// A wgmma kernel (nf4_wgmma_kernel's parameter list) of BM tokens and WARPS warps a block over the grid (weight-row
// groups, splits of K, token groups), with SMEM bytes of dynamic shared memory.
template <typename T, auto KERNEL, int BM, int WARPS, int SMEM>
torch::Tensor launch_wgmma_grid(const torch::Tensor& x, const torch::Tensor& tile_codes,
                                const torch::Tensor& tile_scales, const torch::Tensor& table,
                                const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t split_k,
                                bool defer_sum) {
  const int M = x.size(0), N = out.size(1);
  allow_dynamic_smem<KERNEL>(SMEM);
  const int row_groups = ((N + 15) / 16 + WARPS - 1) / WARPS;
  return run_split<T>(x, bias, out, split_k,
                      [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                          int blocks_per_split) {
    launch_tile_layout(KERNEL, dim3(row_groups, splits, (M + BM - 1) / BM), WARPS * 32, SMEM, stream, x, tile_codes,
                       tile_scales, table, bias_ptr, out_ptr, partial, N, blocks_per_split);
  }, programmatic_launch(), defer_sum);
}

template <typename T, int BM, int MIN_BLOCKS, int KB, int WARPS = WG_WARPS, bool ONE_WAIT = false>
torch::Tensor launch_wgmma(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                           const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                           int64_t split_k, bool defer_sum) {
  return launch_wgmma_grid<T, nf4_wgmma_kernel<T, BM, MIN_BLOCKS, KB, WARPS, ONE_WAIT>, BM, WARPS,
                           WgmmaSmem<BM, KB, ONE_WAIT>::bytes>(x, tile_codes, tile_scales, table, bias, out, split_k,
                                                               defer_sum);
}

// nf4_wgmma_resident_kernel of BM tokens and WGS warpgroups a block: grid (blocks a split, splits, token groups), as
// many blocks a split as fill the SMs once (one block an SM) or give every unit a warpgroup, whichever is fewer.
template <typename T, int BM, int WGS, bool PAIRS>
torch::Tensor launch_wgmma_resident(const torch::Tensor& x, const torch::Tensor& tile_codes,
                                    const torch::Tensor& tile_scales, const torch::Tensor& table,
                                    const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t split_k,
                                    bool defer_sum) {
  constexpr auto kernel = nf4_wgmma_resident_kernel<T, BM, WGS, PAIRS>;
  const int M = x.size(0), N = out.size(1);
  allow_dynamic_smem<kernel>(kResidentSmemMax);
  return run_split<T>(x, bias, out, split_k,
                      [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                          int blocks_per_split) {
    const int smem = resident_smem_bytes(BM, blocks_per_split, PAIRS);
    TORCH_CHECK(smem <= kResidentSmemMax, "resident x of ", blocks_per_split, " quant blocks a split exceeds an SM's ",
                "shared memory: split K further");
    launch_tile_layout(kernel, resident_grid(M, N, BM, WGS, splits, current_device_sms()), WGS * 128, smem, stream,
                       x, tile_codes, tile_scales, table, bias_ptr, out_ptr, partial, N, blocks_per_split);
  }, programmatic_launch(), defer_sum);
}

template <typename T>
torch::Tensor dispatch_wgmma(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                             const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                             int64_t split_k, int64_t block_tokens, int64_t stage_blocks, int64_t blocks_per_sm,
                             int64_t block_warps, bool one_wait, int64_t resident_warpgroups, bool pairs,
                             bool defer_sum) {
  // x resident (nf4_wgmma_resident.cuh): 16 or 32 block tokens and 4-7 warpgroups a block; the 16-entry or the
  // byte-pair table
  TORCH_CHECK(!pairs || resident_warpgroups > 0, "pairs takes the x-resident kernel (resident_warpgroups)");
  if (resident_warpgroups > 0) {
    TORCH_CHECK((block_tokens == 16 || block_tokens == 32) && resident_warpgroups >= 4 && resident_warpgroups <= 7,
                "resident_warpgroups takes 16 or 32 block tokens and 4-7 warpgroups, got ", block_tokens, " and ",
                resident_warpgroups);
#define LORAPLEX_RESIDENT_LAUNCH(BM, WGS)                                                                        \
  (pairs ? launch_wgmma_resident<T, BM, WGS, true>(x, tile_codes, tile_scales, table, bias, out, split_k, defer_sum) \
         : launch_wgmma_resident<T, BM, WGS, false>(x, tile_codes, tile_scales, table, bias, out, split_k, defer_sum))
#define LORAPLEX_RESIDENT_WARPGROUPS(BM)                             \
  switch (resident_warpgroups) {                                    \
    case 4: return LORAPLEX_RESIDENT_LAUNCH(BM, 4);                 \
    case 5: return LORAPLEX_RESIDENT_LAUNCH(BM, 5);                 \
    case 6: return LORAPLEX_RESIDENT_LAUNCH(BM, 6);                 \
    default: return LORAPLEX_RESIDENT_LAUNCH(BM, 7);                \
  }
    if (block_tokens == 16) LORAPLEX_RESIDENT_WARPGROUPS(16)
    LORAPLEX_RESIDENT_WARPGROUPS(32)
#undef LORAPLEX_RESIDENT_WARPGROUPS
#undef LORAPLEX_RESIDENT_LAUNCH
  }
#define LORAPLEX_WGMMA_LAUNCH(BM, MIN_BLOCKS, KB, ...) \
  launch_wgmma<T, BM, MIN_BLOCKS, KB, ##__VA_ARGS__>(x, tile_codes, tile_scales, table, bias, out, split_k, defer_sum)
  // One wait for global loads a stage (nf4_wgmma_kernel's ONE_WAIT; cuda_nf4.one_wait_for): two warpgroups,
  // one block a stage, 32-128 block tokens at the default instances' occupancy (or two blocks an SM at 32).
  if (one_wait) {
    TORCH_CHECK(block_warps == 8 && stage_blocks == 1 && block_tokens <= 128,
                "one_wait takes two warpgroups, one block a stage and at most 128 block tokens");
    if (block_tokens == 32) {
      return blocks_per_sm == 3 ? LORAPLEX_WGMMA_LAUNCH(32, 3, 1, 8, true) : LORAPLEX_WGMMA_LAUNCH(32, 2, 1, 8, true);
    }
    return block_tokens == 64 ? LORAPLEX_WGMMA_LAUNCH(64, 2, 1, 8, true) : LORAPLEX_WGMMA_LAUNCH(128, 1, 1, 8, true);
  }
  // The variants, at 32 tokens only: two blocks a stage (125 registers; at 64 tokens it spilled 24 bytes), or three
  // blocks an SM (80 registers, no spills: 24 warps an SM instead of 16 to hide the loads and the waits).
  TORCH_CHECK(stage_blocks == 1 || (stage_blocks == 2 && block_tokens == 32),
              "stage_blocks must be 1, or 2 with 32 block tokens, got ", stage_blocks);
  TORCH_CHECK(blocks_per_sm == 0 || (blocks_per_sm == 3 && block_tokens == 32 && stage_blocks == 1),
              "blocks_per_sm must be 0 (the instance's own), or 3 with 32 block tokens and one block a stage, got ",
              blocks_per_sm);
  // One warpgroup a block (64 weight rows): twice the blocks, so a grid of 224 row groups (8B gate_up) spreads over
  // 132 SMs as 448 instead of 1.7 blocks an SM at most 2. At 32 and 64 tokens as many warps an SM as the
  // two-warpgroup instance; at 128 three blocks (12 warps) where the two-warpgroup one fits one (8 warps), at 168
  // registers with 36 bytes spilled (ptxas, sm_90a).
  TORCH_CHECK(block_warps == 8 ||
                  (block_warps == 4 && stage_blocks == 1 && blocks_per_sm == 0 && block_tokens <= 128),
              "block_warps must be 8, or 4 with one block a stage and at most 128 block tokens, got ", block_warps);
  if (block_warps == 4) {
    if (block_tokens == 32) return LORAPLEX_WGMMA_LAUNCH(32, 6, 1, 4);
    return block_tokens == 64 ? LORAPLEX_WGMMA_LAUNCH(64, 4, 1, 4) : LORAPLEX_WGMMA_LAUNCH(128, 3, 1, 4);
  }
  if (block_tokens == 32 && blocks_per_sm == 3) return LORAPLEX_WGMMA_LAUNCH(32, 3, 1);
  if (block_tokens == 32) return stage_blocks == 2 ? LORAPLEX_WGMMA_LAUNCH(32, 2, 2) : LORAPLEX_WGMMA_LAUNCH(32, 2, 1);
  if (block_tokens == 64) return LORAPLEX_WGMMA_LAUNCH(64, 2, 1);
  if (block_tokens == 128) return LORAPLEX_WGMMA_LAUNCH(128, 1, 1);  // at two blocks an SM (128 registers) it spilled
  TORCH_CHECK(block_tokens == 256, "block_tokens must be 32, 64, 128 or 256, got ", block_tokens);
  return LORAPLEX_WGMMA_LAUNCH(256, 1, 1);
#undef LORAPLEX_WGMMA_LAUNCH
}

// x and the tile layout as the wgmma kernels take them: contiguous rows, K a multiple of 64, 16-byte aligned.
static void check_wgmma_inputs(const torch::Tensor& x, const torch::Tensor& tile_codes,
                               const torch::Tensor& tile_scales, const torch::Tensor& out) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2 && x.size(0) >= 1, "x must be a contiguous CUDA [M, K]");
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  check_tile_layout(x, tile_codes, tile_scales, out);
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout on Hopper's warpgroup MMA (nf4_wgmma.cuh): blocks of 128
// weight rows x block_tokens (32, 64, 128 or 256) tokens, stage_blocks quant blocks a barrier (1; 2 at 32 block
// tokens), blocks_per_sm the instance's occupancy (0: its own; 3 at 32 block tokens), block_warps 8 (two warpgroups) or
// 4 (one: 64 weight rows a block, up to 128 block tokens), one_wait (nf4_wgmma_kernel's ONE_WAIT stage),
// resident_warpgroups (0, or 4-7 at 16 or 32 block tokens: nf4_wgmma_resident_kernel, x of a split held in shared
// memory) with pairs (its dequantization from the byte-pair table); any M, K % 64 == 0. Only where nf4_wgmma_built()
// (an sm_90a build). With defer_sum and K split, returns the unsummed fp32 partials [splits, M, N]
// instead (run_split); else None.
torch::Tensor nf4_wgmma(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                        c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t block_tokens,
                        int64_t stage_blocks, int64_t blocks_per_sm, int64_t block_warps, bool one_wait,
                        int64_t resident_warpgroups, bool pairs, bool defer_sum) {
  check_wgmma_inputs(x, tile_codes, tile_scales, out);
  return run_for_dtype(x, [&](auto dtype_tag) {
    return dispatch_wgmma<decltype(dtype_tag)>(x, tile_codes, tile_scales, table, bias, out, split_k, block_tokens,
                                               stage_blocks, blocks_per_sm, block_warps, one_wait,
                                               resident_warpgroups, pairs, defer_sum);
  });
}

// nf4_wgmma_bulk_x_kernel<T, BM, MIN_BLOCKS, WARPS> over x's tile images (x_image_kernel's, for x [M, K]): grid
// (row groups, splits, token groups) as run_split gives it; with CLUSTER_SUM the splits (at most kMaxClusterSplits)
// one cluster, summed by the kernel into out (nothing deferred).
template <typename T, int BM, int MIN_BLOCKS, int WARPS, bool CLUSTER_SUM = false>
torch::Tensor launch_wgmma_bulk_x(const torch::Tensor& x, const torch::Tensor& images, const torch::Tensor& tile_codes,
                                  const torch::Tensor& tile_scales, const torch::Tensor& table,
                                  const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t split_k,
                                  bool defer_sum) {
  constexpr auto kernel = nf4_wgmma_bulk_x_kernel<T, BM, MIN_BLOCKS, WARPS, CLUSTER_SUM>;
  constexpr int smem = BulkSmem<BM, WARPS, CLUSTER_SUM>::bytes;
  allow_dynamic_smem<kernel>(smem);
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const int row_groups = ((N + 15) / 16 + WARPS - 1) / WARPS, groups = (M + BM - 1) / BM;
  const auto images_ptr = reinterpret_cast<const uint8_t*>(images.data_ptr());
  const auto codes_ptr = reinterpret_cast<const uint4*>(tile_codes.data_ptr());
  const auto scales_ptr = reinterpret_cast<const float2*>(tile_scales.data_ptr());
  if constexpr (CLUSTER_SUM) {  // run_split's splits, summed in the kernel
    const auto [blocks_per_split, splits] = split_shape(K, split_k);
    TORCH_CHECK(splits <= kMaxClusterSplits, "cluster_sum takes at most ", kMaxClusterSplits, " splits, got ", splits);
    launch_clustered(kernel, dim3(row_groups, splits, groups), dim3(WARPS * 32), smem,
                     c10::cuda::getCurrentCUDAStream(), programmatic_launch(), splits, images_ptr, codes_ptr,
                     scales_ptr, table.data_ptr<float>(),
                     bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
                     reinterpret_cast<T*>(out.data_ptr()), static_cast<float*>(nullptr), M, N, K, blocks_per_split);
    return torch::Tensor();
  } else {
    return run_split<T>(x, bias, out, split_k,
                        [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                            int blocks_per_split) {
      launch_kernel(kernel, dim3(row_groups, splits, groups), dim3(WARPS * 32), smem, stream, programmatic_launch(),
                    images_ptr, codes_ptr, scales_ptr, table.data_ptr<float>(), bias_ptr, out_ptr, partial, M, N, K,
                    blocks_per_split);
    }, programmatic_launch(), defer_sum);
  }
}

// nf4_wgmma's 128- or 64-token block with x's tiles brought by the TMA unit (nf4_wgmma_bulk.cuh): x_image_kernel
// writes x's tile images, then nf4_wgmma_bulk_x_kernel runs with block_warps 8 (two warpgroups; 128 tokens: two
// blocks an SM, the grid of nf4_wgmma_kernel<T, 128, 1, 1>; 64 tokens: three) or, at 128 tokens, 16 (four
// warpgroups, one block an SM), giving that block's bits for the same split_k. Any M, K % 64 == 0; only where
// nf4_wgmma_built(). With defer_sum and K split, returns the unsummed fp32 partials [splits, M, N] instead
// (run_split); else None. With cluster_sum the splits (at most 8) are summed in the kernel, the same bits, and
// defer_sum is moot: None.
template <int BM>
torch::Tensor bulk_x_for(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                         c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t block_warps,
                         bool cluster_sum, bool defer_sum) {
  const int M = x.size(0), K = x.size(1), groups = (M + BM - 1) / BM;
  torch::Tensor images = torch::empty({static_cast<int64_t>(groups) * BM * K}, x.options());
  return run_for_dtype(x, [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    const int64_t chunks = static_cast<int64_t>(groups) * BM * K / 8;
    launch_kernel(x_image_kernel<T, BM>, dim3(static_cast<unsigned>((chunks + 255) / 256)), dim3(256), 0,
                  c10::cuda::getCurrentCUDAStream(), programmatic_launch(), reinterpret_cast<const T*>(x.data_ptr()),
                  reinterpret_cast<uint32_t*>(images.data_ptr()), M, K);
    // ptxas, sm_90a: 127 registers a thread at 128 tokens (two blocks of 8 warps or one of 16 fill the register
    // file), 80 at 64 (three blocks of 8 warps)
    auto launch = [&](auto summed) {
      constexpr bool SUM = decltype(summed)::value;
      if constexpr (BM == 64) {
        return launch_wgmma_bulk_x<T, 64, 3, 8, SUM>(x, images, tile_codes, tile_scales, table, bias, out, split_k,
                                                      defer_sum);
      } else {
        return block_warps == 16 ? launch_wgmma_bulk_x<T, BM, 1, 16, SUM>(x, images, tile_codes, tile_scales, table,
                                                                          bias, out, split_k, defer_sum)
                                 : launch_wgmma_bulk_x<T, BM, 2, 8, SUM>(x, images, tile_codes, tile_scales, table,
                                                                         bias, out, split_k, defer_sum);
      }
    };
    return cluster_sum ? launch(std::true_type()) : launch(std::false_type());
  });
}

torch::Tensor nf4_wgmma_bulk_x(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales,
                               torch::Tensor table, c10::optional<torch::Tensor> bias, torch::Tensor out,
                               int64_t split_k, int64_t block_tokens, int64_t block_warps, bool cluster_sum,
                               bool defer_sum) {
  TORCH_CHECK((block_tokens == 128 && (block_warps == 8 || block_warps == 16)) ||
                  (block_tokens == 64 && block_warps == 8),
              "bulk_x takes 128 block tokens in 8 or 16 warps, or 64 in 8, got ", block_tokens, " in ", block_warps);
  check_wgmma_inputs(x, tile_codes, tile_scales, out);
  return block_tokens == 64 ? bulk_x_for<64>(x, tile_codes, tile_scales, table, bias, out, split_k, block_warps,
                                             cluster_sum, defer_sum)
                            : bulk_x_for<128>(x, tile_codes, tile_scales, table, bias, out, split_k, block_warps,
                                              cluster_sum, defer_sum);
}

// How many clusters of `splits` blocks of the cluster-summing 128-token bulk_x block (8 warps) the current GPU holds at
// once (cudaOccupancyMaxActiveClusters): why clusters of 4-8 blocks took about twice the kernel where 2 won (forty-ninth
// session; bench.kernels records it). Hopper only: elsewhere the query fails (bench.kernels asks where
// wgmma_supported()).
int64_t nf4_wgmma_cluster_occupancy(int64_t splits) {
  TORCH_CHECK(splits >= 1 && splits <= kMaxClusterSplits, "splits must be 1-", kMaxClusterSplits, ", got ", splits);
  constexpr auto kernel = nf4_wgmma_bulk_x_kernel<__nv_bfloat16, 128, 2, 8, true>;
  constexpr int smem = BulkSmem<128, 8, true>::bytes;
  allow_dynamic_smem<kernel>(smem);
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim = {1, static_cast<unsigned>(splits), 1};
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(current_device_sms(), static_cast<unsigned>(splits), 1);
  config.blockDim = dim3(8 * 32);
  config.dynamicSmemBytes = smem;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
  return clusters;
}

// Whether this build's code for the current GPU has the wgmma kernels (sm_90a), by running a one-thread probe.
bool nf4_wgmma_built() {
  auto flag = torch::zeros({1}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  wgmma_built_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flag.item<int>() == 1;
}
