// The torch side of the NF4 extension's translation units (nf4_mma.cu, nf4_wide.cu, nf4_wgmma.cu): the few torch
// headers they use, and the helpers that launch a kernel on tensors (dtype dispatch, dynamic shared memory, PDL
// launches, split-K partials and their sum, the tile layout's checks). Included after the device code.
#pragma once

// The few torch headers the units use, not torch/extension.h: that one (all of ATen's operators, torch::nn, ...) cost
// ~50 s of the extension's ~110 s build on this project's CPU machine, on every fresh GPU machine and changed source
// (nvcc --time: cudafe++ 22 s, cicc 26 s and gcc 16 s for the headers alone, against 8, 7 and 9 s for these).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

namespace torch {  // the names the units take from torch/extension.h, from the lighter headers above
using at::Tensor;
using at::empty;
using at::zeros;
using at::dtype;
using c10::kBFloat16;
using c10::kHalf;
constexpr auto kFloat32 = c10::kFloat;  // as torch/types.h names them
constexpr auto kInt32 = c10::kInt;
constexpr auto kUInt8 = c10::kByte;
using c10::kCUDA;
}  // namespace torch

// The current device's SM count (cached per device, as ATen's device properties are).
static int current_device_sms() {
  static int sms[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && sms[device] > 0) return sms[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) sms[device] = count;
  return count;
}

// run(T()) with T the CUDA type of x's dtype, bf16 or fp16.
template <typename Run>
auto run_for_dtype(const torch::Tensor& x, Run run) {
  if (x.scalar_type() == torch::kBFloat16) return run(__nv_bfloat16());
  TORCH_CHECK(x.scalar_type() == torch::kHalf, "x must be bf16 or fp16");
  return run(__half());
}

// KERNEL allowed `bytes` of dynamic shared memory (above 48 KB needs the opt-in), once per kernel and device: the
// attribute is the device's, so a process on several GPUs sets it on each.
template <auto KERNEL>
void allow_dynamic_smem(int bytes) {
  static bool allowed[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && allowed[device]) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (device < 64) allowed[device] = true;
}

// Whether the launches below that can be are programmatically dependent (wait_for_prior_grid): the process's
// setting, from set_programmatic_launch (server.kernels.pdl: on sm_90+ unless LORAPLEX_PDL=0). One flag for every unit
// (an inline function's static).
inline bool& programmatic_launch() {
  static bool on = false;
  return on;
}

// Launch `kernel` on `stream` with `smem` bytes of dynamic shared memory, programmatically dependent when `pdl` (the
// kernel must call wait_for_prior_grid before it reads an activation or stores), its grid's blocks in clusters of
// `cluster_y` along y where that is more than 1 (a portable size, <= 8).
template <typename... Params, typename... Args>
void launch_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, int smem, cudaStream_t stream, bool pdl,
                      int cluster_y, Args... args) {
  if (!pdl && cluster_y == 1) {
    kernel<<<grid, block, smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchAttribute attributes[2];
  int count = 0;
  if (pdl) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_y > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count++].val.clusterDim = {1, static_cast<unsigned>(cluster_y), 1};
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

// launch_clustered's launch with no clusters.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, int smem, cudaStream_t stream, bool pdl,
                   Args... args) {
  launch_clustered(kernel, grid, block, smem, stream, pdl, 1, args...);
}

// How run_split splits K: `split_k` asked for over K / 64 quant blocks gives that many blocks a split (the last may
// have fewer) and the splits they make.
struct SplitShape {
  int blocks_per_split, splits;
};
inline SplitShape split_shape(int K, int64_t split_k) {
  const int num_blocks = K / 64;
  const int blocks_per_split = static_cast<int>((num_blocks + split_k - 1) / split_k);
  return {blocks_per_split, (num_blocks + blocks_per_split - 1) / blocks_per_split};
}

// `kernel`, of the tile layout kernels' parameter list (x, codes, scales, the code table, bias, out, fp32 partials,
// M, N, K, quant blocks a split), over `grid` on `stream`: the launch in run_split's body; programmatically dependent
// with the process's setting (each such kernel waits for the kernel ahead before its first read of x).
template <typename T, typename... Params>
void launch_tile_layout(void (*kernel)(Params...), dim3 grid, int threads, int smem, cudaStream_t stream,
                        const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                        const torch::Tensor& table, const T* bias, T* out, float* partial, int N,
                        int blocks_per_split) {
  launch_kernel(kernel, grid, dim3(threads), smem, stream, programmatic_launch(),
                reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(tile_codes.data_ptr()),
                reinterpret_cast<const float2*>(tile_scales.data_ptr()), table.data_ptr<float>(), bias, out, partial,
                static_cast<int>(x.size(0)), N, static_cast<int>(x.size(1)), blocks_per_split);
}

// Grid (row groups, splits[, token groups]) of a kernel whose warps each own `rows_per_warp` 16-row tiles; `body`
// launches it with `partial` null, or fp32 partials [splits, M, N] when K is split, which split_k_sum_kernel sums
// (launched programmatically dependent when `pdl`). With `defer_sum` the partials are returned unsummed (bias not
// added, out not written) for the kernel that reads the output to sum (server/kernels/split_sums.py); else, and when K
// is not split, an undefined tensor (None in Python).
template <typename T, typename Body>
torch::Tensor run_split(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                        int64_t split_k, Body body, bool pdl = false, bool defer_sum = false) {
  const int M = x.size(0), N = out.size(1);
  const auto [blocks_per_split, splits] = split_shape(x.size(1), split_k);
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  torch::Tensor partials;
  if (splits > 1) partials = torch::empty({splits, M, N}, x.options().dtype(torch::kFloat32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  T* out_ptr = reinterpret_cast<T*>(out.data_ptr());
  body(stream, out_ptr, splits > 1 ? partials.data_ptr<float>() : nullptr, bias_ptr, splits, blocks_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1 && defer_sum) return partials;
  if (splits > 1) {
    const int64_t total = static_cast<int64_t>(M) * N;
    launch_kernel(split_k_sum_kernel<T>, dim3((total + 255) / 256), dim3(256), 0, stream, pdl,
                  static_cast<const float*>(partials.data_ptr<float>()), bias_ptr, out_ptr, M, N, splits);
  }
  return torch::Tensor();
}

// out and the tile layout (nf4_layout.tile_pack) of an [N, K] weight, against x [M, K].
static void check_tile_layout(const torch::Tensor& x, const torch::Tensor& tile_codes,
                              const torch::Tensor& tile_scales, const torch::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type(), "out must be contiguous, x's dtype");
  const int64_t tiles = (out.size(1) + 15) / 16, blocks = x.size(1) / 64;
  TORCH_CHECK(tile_codes.scalar_type() == torch::kUInt8 && tile_codes.numel() == tiles * blocks * 512,
              "tile_codes must be uint8 [tiles * blocks * 512]");
  TORCH_CHECK(tile_scales.scalar_type() == torch::kFloat32 && tile_scales.numel() == tiles * blocks * 16,
              "tile_scales must be float32 [tiles * blocks * 16]");
}
