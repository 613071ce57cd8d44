// The warpgroup-MMA kernel's launches (nf4_wgmma.cuh: 17-256 rows on Hopper) and the probe of whether this build has
// it. Its own translation unit so that the extension's sources build in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "nf4_device.cuh"
#include "nf4_wgmma.cuh"
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
// many blocks a split as fill the SMs once (one block an SM) or give every unit a warpgroup, whichever is fewer. With
// LORA also `lora`'s units (nf4_wgmma_resident.cuh's LoraShrink).
template <typename T, int BM, int WGS, bool PAIRS, bool LORA = false>
torch::Tensor launch_wgmma_resident(const torch::Tensor& x, const torch::Tensor& tile_codes,
                                    const torch::Tensor& tile_scales, const torch::Tensor& table,
                                    const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t split_k,
                                    bool defer_sum, LoraShrink lora = {}) {
  constexpr auto kernel = nf4_wgmma_resident_kernel<T, BM, WGS, PAIRS, LORA>;
  const int M = x.size(0), N = out.size(1);
  allow_dynamic_smem<kernel>(kResidentSmemMax);
  const int weight_units = ((N + 15) / 16 + 3) / 4;
  const int token_groups = (M + BM - 1) / BM;
  return run_split<T>(x, bias, out, split_k,
                      [&](cudaStream_t stream, T* out_ptr, float* partial, const T* bias_ptr, int splits,
                          int blocks_per_split) {
    const int smem = resident_smem_bytes(BM, blocks_per_split, PAIRS);
    TORCH_CHECK(smem <= kResidentSmemMax, "resident x of ", blocks_per_split, " quant blocks a split exceeds an SM's ",
                "shared memory: split K further");
    const int units = weight_units + (LORA ? lora_units(lora.rows, blocks_per_split) : 0);
    const int blocks = std::max(1, std::min((units + WGS - 1) / WGS, current_device_sms() / (splits * token_groups)));
    launch_tile_layout(kernel, dim3(blocks, splits, token_groups), WGS * 128, smem, stream, x, tile_codes, tile_scales,
                       table, bias_ptr, out_ptr, partial, N, blocks_per_split, lora);
  }, programmatic_launch(), defer_sum);
}

// run(bm, wgs) with the x-resident kernel's block tokens (16 or 32) and warpgroups (4-7) as integral constants.
template <typename Run>
torch::Tensor with_resident_shape(int64_t block_tokens, int64_t warpgroups, Run run) {
  TORCH_CHECK((block_tokens == 16 || block_tokens == 32) && warpgroups >= 4 && warpgroups <= 7,
              "the x-resident kernel takes 16 or 32 block tokens and 4-7 warpgroups, got ", block_tokens, " and ",
              warpgroups);
  auto by_warpgroups = [&](auto bm) {
    switch (warpgroups) {
      case 4: return run(bm, std::integral_constant<int, 4>());
      case 5: return run(bm, std::integral_constant<int, 5>());
      case 6: return run(bm, std::integral_constant<int, 6>());
      default: return run(bm, std::integral_constant<int, 7>());
    }
  };
  return block_tokens == 16 ? by_warpgroups(std::integral_constant<int, 16>())
                            : by_warpgroups(std::integral_constant<int, 32>());
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
    return with_resident_shape(block_tokens, resident_warpgroups, [&](auto bm, auto wgs) {
      constexpr int BM = decltype(bm)::value, WGS = decltype(wgs)::value;
      return pairs ? launch_wgmma_resident<T, BM, WGS, true>(x, tile_codes, tile_scales, table, bias, out, split_k,
                                                             defer_sum)
                   : launch_wgmma_resident<T, BM, WGS, false>(x, tile_codes, tile_scales, table, bias, out, split_k,
                                                              defer_sum);
    });
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

// nf4_wgmma's x-resident kernel with the byte-pair table (bf16; resident_warpgroups 4-7, 16 or 32 block tokens)
// that also computes a LoRA shrink as units of its walk (nf4_wgmma_resident.cuh's LoRA units): lora_a [rows, K]
// (bf16, contiguous), the step's token_slots [M] and the slot layout's offsets and ranks (int32), num_slices; each
// token's own slot's sums are added into h [M, >= num_slices x its rank] fp32 (zeroed by the caller, rows
// contiguous). Returns nf4_wgmma's result (partials with defer_sum and K split, else None).
torch::Tensor nf4_wgmma_lora(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
                             c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k,
                             int64_t block_tokens, int64_t resident_warpgroups, torch::Tensor lora_a,
                             torch::Tensor token_slots, torch::Tensor offsets, torch::Tensor ranks, int64_t num_slices,
                             torch::Tensor h, bool defer_sum) {
  check_wgmma_inputs(x, tile_codes, tile_scales, out);
  TORCH_CHECK(lora_a.is_cuda() && lora_a.is_contiguous() && lora_a.dim() == 2 && lora_a.size(1) == x.size(1) &&
                  lora_a.size(0) >= 1 && lora_a.scalar_type() == x.scalar_type(),
              "lora_a must be a contiguous [rows >= 1, in_features] tensor of x's dtype");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(lora_a.data_ptr()) % 16 == 0, "lora_a must be 16-byte aligned");
  TORCH_CHECK(lora_a.numel() < (int64_t{1} << 31), "lora_a must have fewer than 2^31 elements (32-bit offsets)");
  TORCH_CHECK(token_slots.is_cuda() && token_slots.scalar_type() == torch::kInt32 && token_slots.numel() >= x.size(0),
              "token_slots must be CUDA int32 with a slot a row of x");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt32 && ranks.scalar_type() == torch::kInt32 &&
                  offsets.numel() == ranks.numel() && offsets.is_cuda() && ranks.is_cuda(),
              "offsets and ranks must be CUDA int32 of one length");
  TORCH_CHECK(h.is_cuda() && h.scalar_type() == torch::kFloat32 && h.dim() == 2 && h.size(0) >= x.size(0) &&
                  h.stride(1) == 1,
              "h must be CUDA float32 [rows of x, columns] with contiguous rows");
  const LoraShrink lora{lora_a.data_ptr(), static_cast<int>(lora_a.size(0)), token_slots.data_ptr<int>(),
                        offsets.data_ptr<int>(), ranks.data_ptr<int>(), static_cast<int>(num_slices),
                        h.data_ptr<float>(), static_cast<int>(h.stride(0))};
  // bf16 only (the engine's 16-bit dtype on GPUs with bf16 tensor cores): each instance costs the extension's build
  // on every fresh GPU machine a few seconds
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "nf4_wgmma_lora takes bf16 x");
  return with_resident_shape(block_tokens, resident_warpgroups, [&](auto bm, auto wgs) {
    constexpr int BM = decltype(bm)::value, WGS = decltype(wgs)::value;
    // not built: at 72 registers a thread ptxas serialized every wgmma of it (C7512; cuda_nf4_lora takes 6)
    if constexpr (BM == 32 && WGS == 7) {
      TORCH_CHECK(false, "nf4_wgmma_lora takes at most 6 warpgroups at 32 block tokens");
      return torch::Tensor();
    } else {
      return launch_wgmma_resident<__nv_bfloat16, BM, WGS, true, true>(x, tile_codes, tile_scales, table, bias, out,
                                                                       split_k, defer_sum, lora);
    }
  });
}

// Whether this build's code for the current GPU has the wgmma kernels (sm_90a), by running a one-thread probe.
bool nf4_wgmma_built() {
  auto flag = torch::zeros({1}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  wgmma_built_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flag.item<int>() == 1;
}
