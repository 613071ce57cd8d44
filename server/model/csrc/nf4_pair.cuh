// NF4 x bf16/fp16 on tensor cores over the tile layout, each code byte dequantized by one 8-byte shared-memory
// load. Included by nf4_mma.cu after the tile kernel (Ops, load_tile_codes and run_split come from there).
//
// Why. The tile kernel spends 3.5 instructions a weight on its dequantization: per weight one byte permute (the
// table offset), one 4-byte table load, one FMUL, half a pack. ncu at one row (8B gate_up, H200): issue slots 72%
// busy, L1 59%, DRAM 36% (results/2026-12-02-nvidia-h200-ncu-tile-lut.txt): the instructions are what cost.
// Here a table of byte pairs, (code[high nibble], code[low nibble]) as float2 for each of the 256 byte values,
// gives both values of a byte in one load, and its address comes from one byte permute: prmt(word, lane_reg)
// places the byte at bits 8-15 and the lane's 8 * lane at bits 0-7. That is 2.5 instructions a weight.
//
// Bank conflicts. 32 lanes loading 8 bytes each at random entries of one 2 KB table would conflict about 3-way.
// The table is kept once per lane instead: entry v of lane l at v * 256 + 8 * l (64 KB a block), so a half-warp's
// 16 loads always fall in 16 distinct bank pairs (2 wavefronts a warp, as for 32 conflict-free 4-byte loads).
// 64 KB a block allows 3 blocks an SM: blocks of 8 warps (24 warps an SM).
//
// Semantics and MMA mapping are the tile kernel's (same lanes, same k permutation, same fp32 products rounded
// once), so its results equal the tile kernel's bit for bit.

constexpr int PAIR_TABLE_BYTES = 256 * 32 * 8;

template <typename T>
__device__ __forceinline__ uint32_t dequant_byte(const char* table, uint32_t word, uint32_t lane8, uint32_t sel,
                                                 float scale) {
  const float2 c = *reinterpret_cast<const float2*>(table + __byte_perm(word, lane8, sel));
  return Ops<T>::pack(c.x * scale, c.y * scale);
}

template <typename T, int NT, int WARPS, int PREFETCH>
__global__ void __launch_bounds__(WARPS * 32) nf4_pair_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ code, const T* __restrict__ bias, void* __restrict__ out,
    int M, int N, int K, int blocks_per_split, int write_partial) {
  extern __shared__ __align__(16) char pair_table[];
  for (int i = threadIdx.x; i < 256 * 32; i += WARPS * 32) {  // entry i / 32 (a byte value), lane slot i % 32
    const int v = i >> 5;
    reinterpret_cast<float2*>(pair_table)[i] = make_float2(__ldg(code + (v >> 4)), __ldg(code + (v & 15)));
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int row_tiles = (N + 15) / 16;
  if (tile >= row_tiles) return;  // after the only __syncthreads
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  const uint32_t lane8 = 8u * lane;  // byte 4 of prmt's pair: bits 0-7 of the table offset

  // As in the tile kernel: every load reads valid memory (blocks clamped to the split, tokens to M - 1).
  const uint4* codes_at = tile_codes + static_cast<int64_t>(tile) * num_blocks * 32 + lane;
  const float2* scales_at = tile_scales + static_cast<int64_t>(tile) * num_blocks * 8 + g;
  const uint4* x_at[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    x_at[nt] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(nt * 8 + g, M - 1)) * K) + 2 * t;

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  uint4 ring_codes[PREFETCH];
  float2 ring_scales[PREFETCH];
#pragma unroll
  for (int i = 0; i < PREFETCH; ++i) {
    const int blk = min(first + i, last - 1);
    ring_codes[i] = load_tile_codes(codes_at + 32 * blk, true);
    ring_scales[i] = __ldg(scales_at + 8 * blk);
  }

  for (int base = first; base < last; base += PREFETCH) {
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
      const int blk = base + i;
      if (blk >= last) break;  // warp-uniform
      const uint4 cur = ring_codes[i];
      const float2 scale = ring_scales[i];
      const int ahead = min(blk + PREFETCH, last - 1);
      ring_codes[i] = load_tile_codes(codes_at + 32 * ahead, true);
      ring_scales[i] = __ldg(scales_at + 8 * ahead);

      uint32_t xb[NT][8];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 v0 = __ldg(x_at[nt] + 8 * blk);
        const uint4 v1 = __ldg(x_at[nt] + 8 * blk + 1);
        xb[nt][0] = v0.x; xb[nt][1] = v0.y; xb[nt][2] = v0.z; xb[nt][3] = v0.w;
        xb[nt][4] = v1.x; xb[nt][5] = v1.y; xb[nt][6] = v1.z; xb[nt][7] = v1.w;
      }

#pragma unroll
      for (int half = 0; half < 2; ++half) {  // code word `half` of each row: k-steps 2 * half, + 1
        const uint32_t w_lo = half ? cur.y : cur.x;  // row g
        const uint32_t w_hi = half ? cur.w : cur.z;  // row g + 8
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * half + jj;
          // byte b of the word to bits 8-15 (selector nibble 1), lane8 to bits 0-7 (nibble 0 = byte 4), zeros above
          const uint32_t sel_a = 0x5504u | (static_cast<uint32_t>(2 * jj) << 4);
          const uint32_t sel_b = 0x5504u | (static_cast<uint32_t>(2 * jj + 1) << 4);
          const uint32_t a0 = dequant_byte<T>(pair_table, w_lo, lane8, sel_a, scale.x);
          const uint32_t a1 = dequant_byte<T>(pair_table, w_hi, lane8, sel_a, scale.y);
          const uint32_t a2 = dequant_byte<T>(pair_table, w_lo, lane8, sel_b, scale.x);
          const uint32_t a3 = dequant_byte<T>(pair_table, w_hi, lane8, sel_b, scale.y);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) Ops<T>::mma(acc[nt], a0, a1, a2, a3, xb[nt][2 * j], xb[nt][2 * j + 1]);
        }
      }
    }
  }
  store_c_fragments<T, NT>(acc, tile * 16 + g, t, M, N, bias, out, write_partial);
}

template <typename T, int NT, int W>
void launch_pair(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                 const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                 int64_t split_k) {
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const int row_tiles = (N + 15) / 16;
  static const cudaError_t opted_in = cudaFuncSetAttribute(
      nf4_pair_kernel<T, NT, W, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, PAIR_TABLE_BYTES);
  C10_CUDA_CHECK(opted_in);
  run_split<T>(x, bias, out, split_k, K / 64, [&](cudaStream_t stream, void* target, const T* bias_ptr, int splits,
                                                  int blocks_per_split) {
    nf4_pair_kernel<T, NT, W, 4><<<dim3((row_tiles + W - 1) / W, splits), W * 32, PAIR_TABLE_BYTES, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(tile_codes.data_ptr()),
        reinterpret_cast<const float2*>(tile_scales.data_ptr()), table.data_ptr<float>(), bias_ptr, target, M, N, K,
        blocks_per_split, splits > 1);
  });
}

// Instances: token tiles 1, 2, 4, 8 (1-8, 9-16, 17-32, 33-64 rows), blocks of 8 or 4 warps.
template <typename T, int NT>
void dispatch_pair_warps(const torch::Tensor& x, const torch::Tensor& tile_codes, const torch::Tensor& tile_scales,
                         const torch::Tensor& table, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                         int64_t split_k, int64_t warps) {
  if (warps == 4) launch_pair<T, NT, 4>(x, tile_codes, tile_scales, table, bias, out, split_k);
  else launch_pair<T, NT, 8>(x, tile_codes, tile_scales, table, bias, out, split_k);
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the tile layout; M <= 64, K % 64 == 0.
void nf4_pair(torch::Tensor x, torch::Tensor tile_codes, torch::Tensor tile_scales, torch::Tensor table,
              c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 64, "nf4_pair takes 1..64 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type(), "out must be contiguous, x's dtype");
  const int64_t tiles = (out.size(1) + 15) / 16, blocks = x.size(1) / 64;
  TORCH_CHECK(tile_codes.scalar_type() == torch::kUInt8 && tile_codes.numel() == tiles * blocks * 512,
              "tile_codes must be uint8 [tiles * blocks * 512]");
  TORCH_CHECK(tile_scales.scalar_type() == torch::kFloat32 && tile_scales.numel() == tiles * blocks * 16,
              "tile_scales must be float32 [tiles * blocks * 16]");
  const int64_t M = x.size(0);
#define LORAPLEX_PAIR(T)                                                                                       \
  if (M <= 8) dispatch_pair_warps<T, 1>(x, tile_codes, tile_scales, table, bias, out, split_k, warps);         \
  else if (M <= 16) dispatch_pair_warps<T, 2>(x, tile_codes, tile_scales, table, bias, out, split_k, warps);   \
  else if (M <= 32) dispatch_pair_warps<T, 4>(x, tile_codes, tile_scales, table, bias, out, split_k, warps);   \
  else dispatch_pair_warps<T, 8>(x, tile_codes, tile_scales, table, bias, out, split_k, warps);
  if (x.scalar_type() == torch::kBFloat16) {
    LORAPLEX_PAIR(__nv_bfloat16)
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kHalf, "x must be bf16 or fp16");
    LORAPLEX_PAIR(__half)
  }
#undef LORAPLEX_PAIR
}

// Resident blocks per SM of the pair kernel instance for `rows` and `warps` (bf16 x, its 64 KB table).
int64_t nf4_pair_blocks_per_sm(int64_t rows, int64_t warps) {
  int blocks = 0;
  const int threads = static_cast<int>(warps) * 32;
#define LORAPLEX_OCC_PAIR(NT)                                                                                    \
  if (warps == 4) {                                                                                             \
    cudaFuncSetAttribute(nf4_pair_kernel<__nv_bfloat16, NT, 4, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize,   \
                         PAIR_TABLE_BYTES);                                                                     \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_pair_kernel<__nv_bfloat16, NT, 4, 4>, threads,    \
                                                  PAIR_TABLE_BYTES);                                            \
  } else {                                                                                                      \
    cudaFuncSetAttribute(nf4_pair_kernel<__nv_bfloat16, NT, 8, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize,   \
                         PAIR_TABLE_BYTES);                                                                     \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_pair_kernel<__nv_bfloat16, NT, 8, 4>, threads,    \
                                                  PAIR_TABLE_BYTES);                                            \
  }
  if (rows <= 8) { LORAPLEX_OCC_PAIR(1) } else if (rows <= 16) { LORAPLEX_OCC_PAIR(2) }
  else if (rows <= 32) { LORAPLEX_OCC_PAIR(4) } else { LORAPLEX_OCC_PAIR(8) }
#undef LORAPLEX_OCC_PAIR
  return blocks;
}
