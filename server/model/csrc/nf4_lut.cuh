// NF4 x bf16/fp16 on tensor cores with the dequantization in registers: no shared-memory table gathers.
// Included by nf4_mma.cu after Ops, store_c_fragments and run_split (one translation unit, one extension).
//
// Why. The tile kernel dequantizes each weight with a gather from a 16-entry fp32 table in shared memory:
// one LDS per weight, 8 L1 wavefronts per 256-weight MMA fragment, as many as the x fragments of four
// token tiles. Here each lane builds, once per (row, quant block), the 16 values that block can take,
// already scaled and rounded exactly as the semantics say (round_to_T(code[i] * absmax), fp32 product):
// 16 FMULs whose code operand comes from the kernel's parameter space, 8 pack conversions, 8 byte
// permutes splitting the values into a low-byte and a high-byte table of 16 bytes (4 registers each).
// A weight is then looked up with byte permutes (prmt): four 4-bit indices select four bytes from
// 8 bytes in one instruction, so four weights cost 2 + 2 + 1 + 1 permutes, then 2 to interleave.
//
// Mapping. Same MMA (m16n8k16, weights on M, tokens on N) as the tile kernel, but a "macro step" spans 4
// quant blocks (256 k): lane t of a quad owns all 64 elements of block 4q + t for its rows g and g + 8,
// so a table is built once per 64 weights. In k-step j (0..15) of the macro step, the lane's column
// pairs (2t, 2t+1) and (2t+8, 2t+9) are its block's elements 4j + {0,1} and 4j + {2,3}: code bytes 2j and
// 2j + 1; x is read with the same permutation (b0 = x[tok, 64 * blk + 4j + {0,1}], b1 = ... + {2,3}).
//
// Layout (server/model/nf4_layout.py, lut_pack): for row tile r and macro step q, 4 chunks x 32 lanes x
// 16 bytes (chunks 0-1: row 16r + g's 32 bytes of block 4q + t; chunks 2-3: row 16r + g + 8's), then 32
// float2 scales (row g, row g + 8) in lane order; rows and blocks past the weight padded with zero codes
// and zero scales (a zero scale makes every value of its block 0; x past K is read as 0).

struct CodeTable {
  float v[16];  // the NF4 code values, passed by value: the kernel's FMULs read them from parameter space
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;  // the plain PTX prmt: selector nibbles with bit 3 clear, so no sign replication
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// The 16 values of one (row, quant block), split into low bytes lo[0..3] and high bytes hi[0..3]
// (byte i % 4 of register i / 4 belongs to code i).
template <typename T>
__device__ __forceinline__ void build_table(const CodeTable& code, float scale, uint32_t (&lo)[4], uint32_t (&hi)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint32_t p0 = Ops<T>::pack(code.v[4 * r] * scale, code.v[4 * r + 1] * scale);
    const uint32_t p1 = Ops<T>::pack(code.v[4 * r + 2] * scale, code.v[4 * r + 3] * scale);
    lo[r] = prmt(p0, p1, 0x6420u);
    hi[r] = prmt(p0, p1, 0x7531u);
  }
}

// Two MMA registers from the 4 nibbles of `sel` (bits 0-15: byte 0's low, byte 0's high, byte 1's low,
// byte 1's high nibble): r0 = (value of byte 0's high nibble, of its low nibble), r1 the same for byte 1.
// sel7 = sel & 0x7777 (the index within a half table); pick = 0x3210 | 4 for each nibble with bit 3 set.
__device__ __forceinline__ void lookup4(uint32_t sel7, uint32_t pick, const uint32_t (&lo)[4], const uint32_t (&hi)[4],
                                        uint32_t& r0, uint32_t& r1) {
  const uint32_t l = prmt(prmt(lo[0], lo[1], sel7), prmt(lo[2], lo[3], sel7), pick);
  const uint32_t h = prmt(prmt(hi[0], hi[1], sel7), prmt(hi[2], hi[3], sel7), pick);
  r0 = prmt(l, h, 0x4051u);
  r1 = prmt(l, h, 0x6273u);
}

// A and B registers of one code word (8 nibbles: k-steps 2v and 2v + 1) for one row: a[0], a[1] for the
// lower half (byte pairs 4v, 4v + 1), a[2], a[3] for the upper half.
__device__ __forceinline__ void lookup_word(uint32_t w, const uint32_t (&lo)[4], const uint32_t (&hi)[4],
                                            uint32_t (&a)[4]) {
  const uint32_t sel7 = w & 0x77777777u;
  const uint32_t pick = ((w >> 1) & 0x44444444u) | 0x32103210u;
  lookup4(sel7, pick, lo, hi, a[0], a[1]);
  lookup4(sel7 >> 16, pick >> 16, lo, hi, a[2], a[3]);
}

__device__ __forceinline__ uint32_t word_of(const uint4 (&c)[4], int chunk, int i) {
  const uint4 v = c[chunk];
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) nf4_lut_kernel(
    const T* __restrict__ x, const uint4* __restrict__ lut_codes, const float2* __restrict__ lut_scales,
    const CodeTable code, const T* __restrict__ bias, void* __restrict__ out,
    int M, int N, int K, int macros, int macros_per_split, int write_partial) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (tile * 16 >= N) return;  // no block-wide synchronisation below
  const int first = blockIdx.y * macros_per_split;
  const int last = min(first + macros_per_split, macros);
  const uint4* codes_at = lut_codes + static_cast<int64_t>(tile) * macros * 128 + lane;  // 4 x 32 uint4 a macro
  const float2* scales_at = lut_scales + static_cast<int64_t>(tile) * macros * 32 + lane;

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  constexpr int STAGES = 2;
  uint4 ring[STAGES][4];
  float2 ring_scales[STAGES];
#pragma unroll
  for (int s = 0; s < STAGES; ++s) {
    const int q = first + s;
    const bool ok = q < last;
#pragma unroll
    for (int c = 0; c < 4; ++c) ring[s][c] = load_tile_codes(codes_at + static_cast<int64_t>(q) * 128 + 32 * c, ok);
    ring_scales[s] = load_tile_scales(scales_at + static_cast<int64_t>(q) * 32, ok);
  }

  for (int base = first; base < last; base += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      const int q = base + s;
      if (q >= last) break;  // warp-uniform
      uint4 cur[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) cur[c] = ring[s][c];
      const float2 scale = ring_scales[s];
      const int ahead = q + STAGES;
      const bool ok = ahead < last;
#pragma unroll
      for (int c = 0; c < 4; ++c) ring[s][c] = load_tile_codes(codes_at + static_cast<int64_t>(ahead) * 128 + 32 * c, ok);
      ring_scales[s] = load_tile_scales(scales_at + static_cast<int64_t>(ahead) * 32, ok);

      uint32_t lo_g[4], hi_g[4], lo_g8[4], hi_g8[4];
      build_table<T>(code, scale.x, lo_g, hi_g);
      build_table<T>(code, scale.y, lo_g8, hi_g8);
      const int k0 = 64 * (4 * q + t);  // this lane's quant block; past K only in the padded last macro
      const bool k_ok = k0 < K;
#pragma unroll
      for (int v = 0; v < 8; ++v) {  // code word v of the block: k-steps 2v, 2v + 1
        uint32_t a_g[4], a_g8[4];
        lookup_word(word_of(cur, v / 4, v % 4), lo_g, hi_g, a_g);
        lookup_word(word_of(cur, 2 + v / 4, v % 4), lo_g8, hi_g8, a_g8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int tok = nt * 8 + g;
          uint4 xv = make_uint4(0u, 0u, 0u, 0u);
          if (tok < M && k_ok) xv = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(tok) * K + k0 + 8 * v));
          Ops<T>::mma(acc[nt], a_g[0], a_g8[0], a_g[1], a_g8[1], xv.x, xv.y);
          Ops<T>::mma(acc[nt], a_g[2], a_g8[2], a_g[3], a_g8[3], xv.z, xv.w);
        }
      }
    }
  }
  store_c_fragments<T, NT>(acc, tile * 16 + g, t, M, N, bias, out, write_partial);
}

template <typename T, int NT, int W>
void launch_lut(const torch::Tensor& x, const torch::Tensor& lut_codes, const torch::Tensor& lut_scales,
                const CodeTable& code, const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t split_k) {
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  const int macros = (K / 64 + 3) / 4;
  const int row_tiles = (N + 15) / 16;
  run_split<T>(x, bias, out, split_k, macros, [&](cudaStream_t stream, void* target, const T* bias_ptr, int splits,
                                                  int macros_per_split) {
    nf4_lut_kernel<T, NT, W><<<dim3((row_tiles + W - 1) / W, splits), W * 32, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(lut_codes.data_ptr()),
        reinterpret_cast<const float2*>(lut_scales.data_ptr()), code, bias_ptr, target, M, N, K, macros,
        macros_per_split, splits > 1);
  });
}

// Token tiles by rows: 1-8 -> 1, 9-16 -> 2, 17-32 -> 4, 33-64 -> 8; warps a block 2, 4 or 8.
template <typename T, int NT>
void dispatch_lut_warps(const torch::Tensor& x, const torch::Tensor& lut_codes, const torch::Tensor& lut_scales,
                        const CodeTable& code, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                        int64_t split_k, int64_t warps) {
  if (warps == 2) launch_lut<T, NT, 2>(x, lut_codes, lut_scales, code, bias, out, split_k);
  else if (warps == 8) launch_lut<T, NT, 8>(x, lut_codes, lut_scales, code, bias, out, split_k);
  else launch_lut<T, NT, 4>(x, lut_codes, lut_scales, code, bias, out, split_k);
}

template <typename T>
void dispatch_lut(const torch::Tensor& x, const torch::Tensor& lut_codes, const torch::Tensor& lut_scales,
                  const CodeTable& code, const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t split_k,
                  int64_t warps) {
  const int64_t M = x.size(0);
  if (M <= 8) dispatch_lut_warps<T, 1>(x, lut_codes, lut_scales, code, bias, out, split_k, warps);
  else if (M <= 16) dispatch_lut_warps<T, 2>(x, lut_codes, lut_scales, code, bias, out, split_k, warps);
  else if (M <= 32) dispatch_lut_warps<T, 4>(x, lut_codes, lut_scales, code, bias, out, split_k, warps);
  else dispatch_lut_warps<T, 8>(x, lut_codes, lut_scales, code, bias, out, split_k, warps);
}

// out[M, N] = x[M, K] @ W^T (+ bias) from the lut layout; M <= 64, K % 64 == 0; `table` the 16 code values.
void nf4_lut(torch::Tensor x, torch::Tensor lut_codes, torch::Tensor lut_scales, std::vector<double> table,
             c10::optional<torch::Tensor> bias, torch::Tensor out, int64_t split_k, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 64, "nf4_lut takes 1..64 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type(), "out must be contiguous, x's dtype");
  TORCH_CHECK(table.size() == 16, "the code table has 16 values");
  const int64_t tiles = (out.size(1) + 15) / 16, macros = (x.size(1) / 64 + 3) / 4;
  TORCH_CHECK(lut_codes.scalar_type() == torch::kUInt8 && lut_codes.numel() == tiles * macros * 2048,
              "lut_codes must be uint8 [tiles * macros * 2048]");
  TORCH_CHECK(lut_scales.scalar_type() == torch::kFloat32 && lut_scales.numel() == tiles * macros * 64,
              "lut_scales must be float32 [tiles * macros * 64]");
  CodeTable code;
  for (int i = 0; i < 16; ++i) code.v[i] = static_cast<float>(table[i]);
  if (x.scalar_type() == torch::kBFloat16) {
    dispatch_lut<__nv_bfloat16>(x, lut_codes, lut_scales, code, bias, out, split_k, warps);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kHalf, "x must be bf16 or fp16");
    dispatch_lut<__half>(x, lut_codes, lut_scales, code, bias, out, split_k, warps);
  }
}

// Resident blocks per SM of the lut kernel instance for `rows` and `warps` (bf16 x).
int64_t nf4_lut_blocks_per_sm(int64_t rows, int64_t warps) {
  int blocks = 0;
  const int threads = static_cast<int>(warps) * 32;
#define LORAPLEX_OCC_LUT(NT)                                                                                        \
  if (warps == 2) cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_lut_kernel<__nv_bfloat16, NT, 2>, threads, 0); \
  else if (warps == 8) cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_lut_kernel<__nv_bfloat16, NT, 8>, threads, 0); \
  else cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nf4_lut_kernel<__nv_bfloat16, NT, 4>, threads, 0);
  if (rows <= 8) { LORAPLEX_OCC_LUT(1) } else if (rows <= 16) { LORAPLEX_OCC_LUT(2) }
  else if (rows <= 32) { LORAPLEX_OCC_LUT(4) } else { LORAPLEX_OCC_LUT(8) }
#undef LORAPLEX_OCC_LUT
  return blocks;
}
