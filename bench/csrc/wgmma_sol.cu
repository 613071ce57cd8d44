// Speed-of-light probes of the NF4 wgmma kernel's stage loop (bench/wgmma_sol.py): the 32-token instance the dispatch
// ran at 17-32 rows (nf4_wgmma_kernel<bf16, 32, 3, 1>: three blocks an SM, one quant block a stage) and the 128-token
// one it runs at 65-128 (<bf16, 128, 1, 1>: one block an SM), each probe the same kernel with parts of a stage left
// out (server/kernels/nf4/csrc/nf4_wgmma.cuh, kWgmmaProbe*), on the server's grid and split of K. NOT the semantics: a
// probe's output is garbage; only its time means anything.
// Built by nvcc alone for sm_90a (no torch headers), called through ctypes. Not part of the server.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "nf4_device.cuh"
#include "nf4_wgmma.cuh"

namespace {

template <int kBlockTokens, int kMinBlocks, int PROBE>
cudaError_t launch(cudaStream_t stream, const void* x, const void* codes, const void* scales, const float* table,
                   void* out, float* partial, int M, int N, int K, int splits) {
  constexpr auto kernel = nf4_wgmma_kernel<__nv_bfloat16, kBlockTokens, kMinBlocks, 1, WG_WARPS, false, PROBE>;
  constexpr int smem = WgmmaSmem<kBlockTokens, 1>::bytes;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int num_blocks = K / 64, blocks_per_split = (num_blocks + splits - 1) / splits;
  const int used_splits = (num_blocks + blocks_per_split - 1) / blocks_per_split;
  const int row_groups = ((N + 15) / 16 + WG_WARPS - 1) / WG_WARPS;
  kernel<<<dim3(row_groups, used_splits, (M + kBlockTokens - 1) / kBlockTokens), WG_WARPS * 32, smem, stream>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const uint4*>(codes), static_cast<const float2*>(scales),
      table, nullptr, static_cast<__nv_bfloat16*>(out), used_splits > 1 ? partial : nullptr, M, N, K,
      blocks_per_split);
  return cudaGetLastError();
}

}  // namespace

// Probe `probe` (an OR of kWgmmaProbe* flags, one of those instantiated below; 0: the server's kernel itself) of the
// block_tokens (32 or 128) instance over the tile layout of an [N, K] weight and x [M, K] bf16: out [M, N] bf16, or
// with splits > 1 the fp32 partials [splits, M, N] (never summed). Returns the launch's cudaError_t.
extern "C" int loraplex_wgmma_sol(int probe, int block_tokens, void* stream, const void* x, const void* codes,
                                  const void* scales, const float* table, void* out, float* partial, int M, int N,
                                  int K, int splits) {
  auto s = static_cast<cudaStream_t>(stream);
  constexpr int kNoX = kWgmmaProbeNoX, kNoBarrier = kWgmmaProbeNoBarrier;
  constexpr int kNoDequant = kWgmmaProbeNoDequant, kNoMma = kWgmmaProbeNoMma;
#define LORAPLEX_WGMMA_SOL(PROBE)                                                             \
  if (probe == (PROBE) && block_tokens == 32)                                                 \
    return launch<32, 3, PROBE>(s, x, codes, scales, table, out, partial, M, N, K, splits);   \
  if (probe == (PROBE) && block_tokens == 128)                                                \
    return launch<128, 1, PROBE>(s, x, codes, scales, table, out, partial, M, N, K, splits);
  LORAPLEX_WGMMA_SOL(0)
  LORAPLEX_WGMMA_SOL(kNoX)
  LORAPLEX_WGMMA_SOL(kNoBarrier)
  LORAPLEX_WGMMA_SOL(kNoX | kNoBarrier)
  LORAPLEX_WGMMA_SOL(kNoDequant)
  LORAPLEX_WGMMA_SOL(kNoMma)
  LORAPLEX_WGMMA_SOL(kNoX | kNoBarrier | kNoMma)
  LORAPLEX_WGMMA_SOL(kNoX | kNoBarrier | kNoDequant)
  LORAPLEX_WGMMA_SOL(kNoX | kNoBarrier | kNoDequant | kNoMma)
#undef LORAPLEX_WGMMA_SOL
  return static_cast<int>(cudaErrorInvalidValue);
}
