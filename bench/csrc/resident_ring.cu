// The x-resident NF4 kernel with a ring of bulk copies beside its walk (bench/resident_ring.py): the server's
// nf4_wgmma_resident_kernel at 32 tokens with the byte-pair table, its RING template argument > 0 (RING bytes a stage
// brought by the TMA unit into shared memory, never read), on the server's grid. What a LoRA shrink fed that way
// would add to the dequantization's shared-memory traffic; the output is the kernel's (RING changes no arithmetic).
// Built by nvcc alone for sm_90a (no torch headers), called through ctypes. Not part of the server.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "nf4_device.cuh"
#include "nf4_wgmma.cuh"
#include "nf4_wgmma_bulk.cuh"
#include "nf4_wgmma_resident.cuh"

namespace {

template <int WGS, int RING>
cudaError_t launch(cudaStream_t stream, const void* x, const void* codes, const void* scales, const float* table,
                   void* out, float* partial, int M, int N, int K, int splits, int num_sms) {
  constexpr int BM = 32;
  constexpr auto kernel = nf4_wgmma_resident_kernel<__nv_bfloat16, BM, WGS, true, RING>;
  const int num_blocks = K / 64, blocks_per_split = (num_blocks + splits - 1) / splits;
  const int used_splits = (num_blocks + blocks_per_split - 1) / blocks_per_split;
  // the server's bytes (nf4_wgmma.cu's launch_wgmma_resident), then the ring's (RingAt: its slots, mbarriers and count
  // at the top)
  const int smem = resident_smem_bytes(BM, blocks_per_split, true) + (RING > 0 ? ring_slots(RING) * RING + 256 : 0);
  if (smem > kResidentSmemMax) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<resident_grid(M, N, BM, WGS, used_splits, num_sms), WGS * 128, smem, stream>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const uint4*>(codes), static_cast<const float2*>(scales),
      table, nullptr, static_cast<__nv_bfloat16*>(out), used_splits > 1 ? partial : nullptr, M, N, K,
      blocks_per_split);
  return cudaGetLastError();
}

}  // namespace

// The bytes the ring's copies walk (16-byte aligned; a multiple of every ring size below). Returns a cudaError_t.
extern "C" int loraplex_resident_ring_source(const void* src, unsigned long long bytes) {
  const uint8_t* ptr = static_cast<const uint8_t*>(src);
  const uint64_t size = bytes;
  cudaError_t err = cudaMemcpyToSymbol(g_ring_src, &ptr, sizeof(ptr));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(g_ring_src_bytes, &size, sizeof(size));
  return static_cast<int>(err);
}

// One launch of the 32-token pair-table resident kernel of `warpgroups` (6 or 7) warpgroups with a ring of `ring`
// bytes a stage (0, 1024, 2048, 3072 or 4096) over the tile layout of an [N, K] weight and x [M, K] bf16 (M <= 32):
// out [M, N] bf16, or with splits > 1 the fp32 partials [splits, M, N] (never summed). Returns a cudaError_t
// (cudaErrorInvalidConfiguration: the ring does not fit beside x and the table).
extern "C" int loraplex_resident_ring(int warpgroups, int ring, void* stream, const void* x, const void* codes,
                                      const void* scales, const float* table, void* out, float* partial, int M, int N,
                                      int K, int splits, int num_sms) {
  auto s = static_cast<cudaStream_t>(stream);
#define LORAPLEX_RING(WGS, RING)                                                                        \
  if (warpgroups == (WGS) && ring == (RING))                                                            \
    return launch<WGS, RING>(s, x, codes, scales, table, out, partial, M, N, K, splits, num_sms);
#define LORAPLEX_RINGS(WGS) \
  LORAPLEX_RING(WGS, 0) LORAPLEX_RING(WGS, 1024) LORAPLEX_RING(WGS, 2048) LORAPLEX_RING(WGS, 3072) \
  LORAPLEX_RING(WGS, 4096)
  LORAPLEX_RINGS(6)
  LORAPLEX_RINGS(7)
#undef LORAPLEX_RINGS
#undef LORAPLEX_RING
  return static_cast<int>(cudaErrorInvalidValue);
}
