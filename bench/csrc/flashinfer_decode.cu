// FlashInfer's paged batch decode (its CUDA-core kernel, no KV partition) over loraplex's KV cache, for
// bench/flashinfer_decode.py: does a library kernel read the decode step's K and V faster than triton_attention's?
// Built by nvcc alone against FlashInfer's headers (unzipped from its wheel into an ignored folder, never committed:
// bench/flashinfer_decode.py --fetch), called through ctypes. Not part of the server.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <flashinfer/attention/decode.cuh>
#include <flashinfer/attention/default_decode_params.cuh>
#include <flashinfer/attention/variants.cuh>

namespace {

using Params = flashinfer::BatchDecodeParams<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, int32_t>;
using Variant = flashinfer::DefaultAttention</*custom mask*/ false, /*sliding window*/ false, /*soft cap*/ false,
                                             /*alibi*/ false>;

}  // namespace

// out [B, Hq, 128] = decode attention of q [B, Hq, 128] over the cache k, v [blocks, page_size, Hkv, 128] (loraplex's
// layout: FlashInfer's NHD pages), row b's pages indices[indptr[b]:indptr[b + 1]], its last page holding
// last_page_len[b] positions. request_indices [B] (0..B-1), kv_tile_indices [B] (zeros) and kv_chunk_size (one int,
// unused without partition) are the scheduler's arrays for one block a row and kv head. Returns a cudaError_t.
extern "C" int loraplex_flashinfer_decode(void* stream, void* q, void* k, void* v, int32_t* indices, int32_t* indptr,
                                          int32_t* last_page_len, void* out, int32_t* request_indices,
                                          int32_t* kv_tile_indices, int32_t* kv_chunk_size, int batch,
                                          int num_qo_heads, int num_kv_heads, int page_size, float sm_scale) {
  constexpr uint32_t kHeadDim = 128;
  flashinfer::paged_kv_t<__nv_bfloat16, int32_t> paged_kv(
      num_kv_heads, page_size, kHeadDim, batch, flashinfer::QKVLayout::kNHD, static_cast<__nv_bfloat16*>(k),
      static_cast<__nv_bfloat16*>(v), indices, indptr, last_page_len);
  Params params(static_cast<__nv_bfloat16*>(q), /*q_rope_offset*/ nullptr, paged_kv,
                static_cast<__nv_bfloat16*>(out), /*lse*/ nullptr, /*alibi slopes*/ nullptr, num_qo_heads,
                /*q_stride_n*/ num_qo_heads * kHeadDim, /*q_stride_h*/ kHeadDim, /*window_left*/ -1,
                /*logits_soft_cap*/ 0.f, sm_scale, /*rope_scale*/ 1.f, /*rope_theta*/ 1e4f);
  params.padded_batch_size = batch;
  params.request_indices = request_indices;
  params.kv_tile_indices = kv_tile_indices;
  params.o_indptr = nullptr;
  params.kv_chunk_size_ptr = kv_chunk_size;
  params.block_valid_mask = nullptr;
  return static_cast<int>(
      flashinfer::BatchDecodeWithPagedKVCacheDispatched<kHeadDim, flashinfer::PosEncodingMode::kNone, Variant>(
          params, /*tmp_v*/ nullptr, /*tmp_s*/ nullptr, /*enable_pdl*/ false, static_cast<cudaStream_t>(stream)));
}
