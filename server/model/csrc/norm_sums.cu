// The residual add and RMS norm after o_proj and down_proj, reading the projection's split-K partials and summing
// them on the way in (llama.defer_norm_sums, LORAPLEX_NORM_SPLIT_SUMS=1; sm_90: thread-block clusters).
//
// One cluster of kNormCluster blocks a row: each block sums its share of the row's columns from the partials (in
// split order from 0, then the bias, rounded once: split_k_sum_kernel's values bit for bit), adds the residual
// (stored rounded, as triton_glue's add_rmsnorm), and the row's sum of squares is the blocks' sums added in rank order
// through distributed shared memory: deterministic, the same for every block of the row. Why: Triton's add_rmsnorm
// over the partials runs one program a row (16 planes of a 4,096-wide row, 256 KB for one SM) and measured slower
// than the sum kernel then the norm (8B merged batch-32 step 4.250 against 3.812 ms, H100, forty-fourth session);
// here 8 SMs read a row's partials, and a layer's two sum kernels and two norms become two kernels.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <vector>

#include "nf4_device.cuh"

namespace {

constexpr int kNormCluster = 8;  // blocks a row (a portable cluster)
// One column a thread at 4,096 (the 8B shape). The first form, 128 threads of 4 columns, measured slower than the sum
// kernel then the norm: H100, 8B merged batch-32 step 4.131 against 3.724 ms, o's and down's sum + norm ending 7.7
// and 8.7 us after their projection against 4.3 and 3.9, and gate_up after it slower (45 against 38 us; bench/results/
// 2026-12-07-nvidia-h100-80gb-hbm3-8b-b32-merged-profile-s49-cluster-norm.json): a quarter of the sum kernel's
// threads, each with its columns' partial loads. This form is not yet timed.
constexpr int kNormThreads = 512;
constexpr int kNormValues = 2;  // columns a thread at most: rows up to kNormCluster * kNormThreads * 2 = 8,192 wide

template <typename T>
__global__ void __launch_bounds__(kNormThreads) split_sums_add_rmsnorm_kernel(
    const float* __restrict__ partial, const T* __restrict__ bias, const T* __restrict__ h,
    const T* __restrict__ weight, T* __restrict__ h_out, T* __restrict__ y, int M, int N, int splits, float eps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ float warp_sums[kNormThreads / 32];
  __shared__ float block_sum;
  const int64_t row = blockIdx.x;
  const int chunk = (N + kNormCluster - 1) / kNormCluster;
  const int begin = blockIdx.y * chunk, end = min(begin + chunk, N);
  float w[kNormValues], x[kNormValues];
#pragma unroll
  for (int i = 0; i < kNormValues; ++i) {  // the weight before the wait: no kernel of a step writes it
    const int c = begin + i * kNormThreads + threadIdx.x;
    w[i] = c < end ? Ops<T>::to_float(weight[c]) : 0.f;
  }
  wait_for_prior_grid();
  const int64_t plane = static_cast<int64_t>(M) * N;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < kNormValues; ++i) {
    const int c = begin + i * kNormThreads + threadIdx.x;
    x[i] = 0.f;
    if (c < end) {
      const int64_t at = row * N + c;
      float delta = sum_splits(partial + at, plane, splits);
      if (bias != nullptr) delta += Ops<T>::to_float(bias[c]);
      const T sum = Ops<T>::from_float(Ops<T>::to_float(h[at]) + Ops<T>::to_float(Ops<T>::from_float(delta)));
      h_out[at] = sum;
      x[i] = Ops<T>::to_float(sum);
      squares += x[i] * x[i];
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = squares;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kNormThreads / 32; ++k) s += warp_sums[k];
    block_sum = s;
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's sum stored (and visible to the cluster) before any is read
  float total = 0.f;
#pragma unroll
  for (int r = 0; r < kNormCluster; ++r) total += *cluster.map_shared_rank(&block_sum, r);
  cluster.sync();  // every block's sum read before any block exits
  const float inv = 1.f / sqrtf(total / N + eps);
#pragma unroll
  for (int i = 0; i < kNormValues; ++i) {
    const int c = begin + i * kNormThreads + threadIdx.x;
    if (c < end) {
      const float normed = Ops<T>::to_float(Ops<T>::from_float(x[i] * inv));
      y[row * N + c] = Ops<T>::from_float(w[i] * normed);
    }
  }
#endif
}

}  // namespace

#include "nf4_launch.cuh"

// (h + summed(partials) + bias, rmsnorm(that) * weight) for partials [splits, M, N] fp32 and h [M, N]; sm_90 only.
std::vector<torch::Tensor> split_sums_add_rmsnorm(torch::Tensor partials, c10::optional<torch::Tensor> bias,
                                                  torch::Tensor h, torch::Tensor weight, double eps) {
  TORCH_CHECK(partials.is_cuda() && partials.scalar_type() == torch::kFloat32 && partials.dim() == 3 &&
                  partials.is_contiguous(),
              "split_sums_add_rmsnorm: partials must be contiguous CUDA float32 [splits, M, N]");
  const int splits = partials.size(0), M = partials.size(1), N = partials.size(2);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == M && h.size(1) == N && h.is_contiguous(),
              "split_sums_add_rmsnorm: h must be contiguous [M, N] as the partials' planes");
  TORCH_CHECK(h.scalar_type() == torch::kBFloat16 || h.scalar_type() == torch::kHalf,
              "split_sums_add_rmsnorm: h must be bf16 or fp16");
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && weight.numel() == N && weight.is_contiguous(),
              "split_sums_add_rmsnorm: weight must be [N] in h's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == h.scalar_type() && bias->numel() == N),
              "split_sums_add_rmsnorm: bias must be [N] in h's dtype");
  TORCH_CHECK(N <= kNormCluster * kNormThreads * kNormValues, "split_sums_add_rmsnorm: rows at most ",
              kNormCluster * kNormThreads * kNormValues, " wide, got ", N);
  TORCH_CHECK(splits >= 1, "split_sums_add_rmsnorm: no partials");
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TORCH_CHECK(major >= 9, "split_sums_add_rmsnorm needs thread-block clusters (sm_90+)");
  auto h_out = torch::empty(h.sizes(), h.options()), y = torch::empty(h.sizes(), h.options());
  if (M == 0) return {h_out, y};
  run_for_dtype(h, [&](auto tag) {
    using T = decltype(tag);
    launch_clustered(split_sums_add_rmsnorm_kernel<T>, dim3(M, kNormCluster), dim3(kNormThreads), 0,
                     c10::cuda::getCurrentCUDAStream(), programmatic_launch(), kNormCluster,
                     partials.data_ptr<float>(),
                     bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
                     reinterpret_cast<const T*>(h.data_ptr()), reinterpret_cast<const T*>(weight.data_ptr()),
                     reinterpret_cast<T*>(h_out.data_ptr()), reinterpret_cast<T*>(y.data_ptr()), M, N, splits,
                     static_cast<float>(eps));
    return 0;
  });
  return {h_out, y};
}
