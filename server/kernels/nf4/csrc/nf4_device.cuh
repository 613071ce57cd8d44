// Device helpers of the NF4 tensor-core kernels (nf4_mma.cu, nf4_wide.cu, nf4_wgmma.cu), shared with the
// speed-of-light probes of bench/csrc/nf4_sol.cu: the MMA and rounding per dtype, the code table in shared memory, the
// dequantization of one lane's A fragments, the tile layout's register ring, the C fragments' store, the split-K sum.
// No torch headers (the probes build with nvcc alone).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

template <typename T> struct Ops;

template <> struct Ops<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <> struct Ops<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// The fp32 code at byte offset byte b of `offs` in the 16-entry table at `lut` (shared memory).
__device__ __forceinline__ float load_code(const char* lut, uint32_t offs, int b) {
  return *reinterpret_cast<const float*>(lut + __byte_perm(offs, 0u, 0x4440u | static_cast<uint32_t>(b)));
}

// The 16-entry table at a 256-byte-aligned shared-memory address: a code's address is one byte permute (the offset
// into byte 0, the table's address bytes 1-3), where through a pointer ptxas added the table's base to every address
// unless it could keep the base in a uniform register (nf4_wgmma_resident_kernel's walk: an IADD a load).
struct TableAt {
  uint32_t addr;
};
__device__ __forceinline__ float load_code(TableAt lut, uint32_t offs, int b) {
  const uint32_t addr = __byte_perm(offs, lut.addr, 0x7650u | static_cast<uint32_t>(b));
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// Two dequantized, rounded values (element 2i: high nibble, element 2i + 1: low nibble) of byte `b` of
// `hi_offs` / `lo_offs` (byte offsets into the fp32 table, precomputed for the 4 bytes of a word).
template <typename T, typename Lut>
__device__ __forceinline__ uint32_t dequant_pair(Lut lut, uint32_t hi_offs, uint32_t lo_offs, int b, float scale) {
  const float even = load_code(lut, hi_offs, b);
  const float odd = load_code(lut, lo_offs, b);
  return Ops<T>::pack(even * scale, odd * scale);
}

// The 16-entry fp32 code table in shared memory, as the byte address dequant_pair indexes; a block barrier (every
// thread of the block must call it).
__device__ __forceinline__ const char* stage_code_table(const float* __restrict__ table) {
  __shared__ float lut_shared[16];
  if (threadIdx.x < 16) lut_shared[threadIdx.x] = table[threadIdx.x];
  __syncthreads();
  return reinterpret_cast<const char*>(lut_shared);
}

// The byte-pair table (nf4_gemv_pairs_kernel; bench/csrc/nf4_sol.cu's byte-table probes): for each byte value v, its
// two weights' fp32 codes, float2 (code[v >> 4], code[v & 15]) (high nibble first, as dequant_pair), in kPairCopies
// copies, copy c at byte 256 v + 8 c. Lane l reads copy l & 15: the 16 lanes of a half-warp (one wavefront of 8-byte
// loads) touch 32 distinct banks whatever values they read, so a warp's 32 pairs (64 weights) take 2 wavefronts, as
// the 16-entry table's 2 loads of 32 weights do, but in one instruction. Rows of 256 bytes (the upper 128 unused)
// make the address one byte permute: the byte's value into byte 1, the lane's copy offset into byte 0 (pair_offset).
// A weight pair is then 5 instructions (permute, load, two fp32 multiplies, the pack) where dequant_pair's take 8.
constexpr int kPairCopies = 16;
constexpr int kPairTableBytes = 255 * 256 + kPairCopies * 8;  // the span from value 0's row to value 255's last copy

// Fill `pairs` (kPairTableBytes of shared memory, 16-byte aligned) from the 16-entry fp32 code table, with every
// thread of the block; the caller's barrier makes it visible.
__device__ __forceinline__ void stage_pair_table(const float* __restrict__ table, char* pairs) {
  for (int i = threadIdx.x; i < 256 * kPairCopies / 2; i += blockDim.x) {  // two copies a 16-byte store
    const int v = i / (kPairCopies / 2);
    const float hi = __ldg(table + (v >> 4)), lo = __ldg(table + (v & 15));
    *reinterpret_cast<float4*>(pairs + 256 * v + 16 * (i % (kPairCopies / 2))) = make_float4(hi, lo, hi, lo);
  }
}

// Where a kernel that keeps the pair table at a 64 KB boundary of its block's shared-memory window puts it (its
// address bytes 2-3 are then load_pair_at's permute's), and the window offset past it.
constexpr uint32_t kPairsTableWindow = 0x10000;
__host__ __device__ constexpr int pairs_table_end() {
  return static_cast<int>(kPairsTableWindow) + (kPairTableBytes + 15) / 16 * 16;
}

// The lane's copy offset in the pair table (byte 0 of pair_offset's result).
__device__ __forceinline__ uint32_t pair_copy_offset() { return 8u * (threadIdx.x & (kPairCopies - 1)); }

// Byte b of `word`'s row in a table of 256-byte rows, + copy_off (< 256): (value << 8) | copy_off, one PRMT.
__device__ __forceinline__ uint32_t pair_offset(uint32_t word, int b, uint32_t copy_off) {
  return __byte_perm(word, copy_off, 0x5504u | (static_cast<uint32_t>(b) << 4));
}

// The 4 A-fragment registers of half `half` of a quant block, in a_fragments' order, from a byte table: `pair(word,
// b, row)` gives byte b's two weights packed (row 0: the lane's row g, scale x; 1: row g + 8, scale y).
template <typename Pair>
__device__ __forceinline__ void byte_table_fragments(uint4 codes, int half, Pair pair, uint32_t (&a)[2][4]) {
  const uint32_t w_lo = half ? codes.y : codes.x, w_hi = half ? codes.w : codes.z;
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    a[jj][0] = pair(w_lo, 2 * jj, 0);
    a[jj][1] = pair(w_hi, 2 * jj, 1);
    a[jj][2] = pair(w_lo, 2 * jj + 1, 0);
    a[jj][3] = pair(w_hi, 2 * jj + 1, 1);
  }
}

// a_fragments from the pair table: the same values bit for bit (one fp32 multiply a weight, one rounding).
template <typename T>
__device__ __forceinline__ void a_fragments_pairs(const char* pairs, uint32_t copy_off, uint4 codes, float2 scales,
                                                  int half, uint32_t (&a)[2][4]) {
  byte_table_fragments(codes, half, [&](uint32_t word, int b, int row) {
    const float2 v = *reinterpret_cast<const float2*>(pairs + pair_offset(word, b, copy_off));
    const float scale = row ? scales.y : scales.x;
    return Ops<T>::pack(v.x * scale, v.y * scale);
  }, a);
}

__device__ __forceinline__ uint4 load_tile_codes(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// The codes and scales of a warp's RT row tiles in the tile layout, PREFETCH quant blocks ahead in a register
// ring. A tile past the last re-reads the last one (its rows are never stored); blocks past the split are clamped
// to its last one (refills that are never used): every load reads valid memory, so none is predicated.
template <int RT, int PREFETCH>
struct TileRing {
  const uint4* codes_at[RT];
  const float2* scales_at[RT];
  uint4 codes[PREFETCH][RT];
  float2 scales[PREFETCH][RT];

  // Slots 0 .. preload - 1 loaded with blocks first, first + 1, ...: PREFETCH for take, fewer for a reader that
  // refills by load (nf4_wgmma_kernel's one-wait stage preloads one).
  __device__ __forceinline__ TileRing(const uint4* tile_codes, const float2* tile_scales, int tile0, int row_tiles,
                                      int num_blocks, int lane, int first, int last, int preload = PREFETCH) {
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int tile = tile0 + r < row_tiles ? tile0 + r : min(tile0, row_tiles - 1);
      codes_at[r] = tile_codes + static_cast<int64_t>(tile) * num_blocks * 32 + lane;  // 32 uint4 a block
      scales_at[r] = tile_scales + static_cast<int64_t>(tile) * num_blocks * 8 + (lane >> 2);  // 8 float2
    }
#pragma unroll
    for (int p = 0; p < PREFETCH; ++p) {
      if (p < preload) load(p, first + p, last);
    }
  }

  // Slot p loaded with block blk (clamped to the split's last); `z` is 0, computed from loaded registers so that the
  // loads issue after them.
  __device__ __forceinline__ void load(int p, int blk, int last, uint32_t z = 0) {
    const int b = min(blk, last - 1);
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      codes[p][r] = load_tile_codes(codes_at[r] + 32 * b + static_cast<int>(z));
      scales[p][r] = __ldg(scales_at[r] + 8 * b + static_cast<int>(z));
    }
  }

  // Block `blk`, held in slot p, into cur; slot p refilled with block blk + PREFETCH (clamped).
  __device__ __forceinline__ void take(int p, int blk, int last, uint4 (&cur_codes)[RT], float2 (&cur_scales)[RT]) {
    const int ahead = min(blk + PREFETCH, last - 1);
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      cur_codes[r] = codes[p][r];
      cur_scales[r] = scales[p][r];
      codes[p][r] = load_tile_codes(codes_at[r] + 32 * ahead);
      scales[p][r] = __ldg(scales_at[r] + 8 * ahead);
    }
  }
};

// The A fragments of k-steps 2 * half and 2 * half + 1 of one row tile's quant block: lane (g, t) holds rows g and
// g + 8, and in k-step j code bytes 2j (columns 2t, 2t + 1) and 2j + 1 (columns 2t + 8, 2t + 9) of its 8 (tile
// layout: words x, y of row g; z, w of row g + 8).
template <typename T, typename Lut>
__device__ __forceinline__ void a_fragments(Lut lut, uint4 codes, float2 scales, int half, uint32_t (&a)[2][4]) {
  const uint32_t w_lo = half ? codes.y : codes.x;  // row g
  const uint32_t w_hi = half ? codes.w : codes.z;  // row g + 8
  const uint32_t lo_even = (w_lo >> 2) & 0x3C3C3C3Cu, lo_odd = (w_lo << 2) & 0x3C3C3C3Cu;
  const uint32_t hi_even = (w_hi >> 2) & 0x3C3C3C3Cu, hi_odd = (w_hi << 2) & 0x3C3C3C3Cu;
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    a[jj][0] = dequant_pair<T>(lut, lo_even, lo_odd, 2 * jj, scales.x);
    a[jj][1] = dequant_pair<T>(lut, hi_even, hi_odd, 2 * jj, scales.y);
    a[jj][2] = dequant_pair<T>(lut, lo_even, lo_odd, 2 * jj + 1, scales.x);
    a[jj][3] = dequant_pair<T>(lut, hi_even, hi_odd, 2 * jj + 1, scales.y);
  }
}

// x's 16 values of one quant block for quad lane t, from p (the lane's base + 8 uint4 a block), as the B fragments of
// the block's 4 k-steps: words 2j and 2j + 1 for k-step j.
__device__ __forceinline__ void load_x_block(const uint4* p, uint32_t (&xb)[8]) {
  const uint4 v0 = __ldg(p);
  const uint4 v1 = __ldg(p + 1);
  xb[0] = v0.x; xb[1] = v0.y; xb[2] = v0.z; xb[3] = v0.w;
  xb[4] = v1.x; xb[5] = v1.y; xb[6] = v1.z; xb[7] = v1.w;
}

// The pair table at a 64 KB-aligned offset of the block's shared-memory window (nf4_gemv_pairs_kernel): `pair_reg`
// holds that offset in its upper half and the lane's copy offset in its low byte, so one byte permute (the byte's
// value into byte 1, the rest from pair_reg) gives the load's whole address. Through a generic pointer the compiler
// added the window's base to every address (nvcc 13, sm_90a: an IADD a pair, 6 instructions where the probes' 5).
// Not volatile: a volatile load stays in program order with the (volatile) MMAs, so a k-step's table loads waited for
// the MMAs before them (H100: gemv_pairs issued on 37% of cycles, 3.5 cycles a warp short-scoreboard stalls). The
// table is constant once filled; the caller launders pair_reg through an empty volatile asm after the barrier that
// publishes it, so that no load can move above that barrier.
__device__ __forceinline__ float2 load_pair_at(uint32_t word, int b, uint32_t pair_reg) {
  const uint32_t addr = __byte_perm(word, pair_reg, 0x7604u | (static_cast<uint32_t>(b) << 4));
  float2 v;
  asm("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// a_fragments_pairs from the 64 KB-aligned table (load_pair_at).
template <typename T>
__device__ __forceinline__ void a_fragments_pairs_at(uint32_t pair_reg, uint4 codes, float2 scales, int half,
                                                     uint32_t (&a)[2][4]) {
  byte_table_fragments(codes, half, [&](uint32_t word, int b, int row) {
    const float2 v = load_pair_at(word, b, pair_reg);
    const float scale = row ? scales.y : scales.x;
    return Ops<T>::pack(v.x * scale, v.y * scale);
  }, a);
}

// One quant block of one 16-row tile against one token tile: acc += the block's A fragments x xb, k-step by k-step;
// with PAIRS the fragments come from the 64 KB-aligned pair table (a_fragments_pairs_at, pair_reg), else from the
// 16-entry table at `lut`.
template <typename T, bool PAIRS = false>
__device__ __forceinline__ void mma_block(const char* lut, uint4 codes, float2 scales, const uint32_t (&xb)[8],
                                          float (&acc)[4], uint32_t pair_reg = 0) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint32_t a[2][4];
    if constexpr (PAIRS) {
      a_fragments_pairs_at<T>(pair_reg, codes, scales, half, a);
    } else {
      a_fragments<T>(lut, codes, scales, half, a);
    }
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int j = 2 * half + jj;
      Ops<T>::mma(acc, a[jj][0], a[jj][1], a[jj][2], a[jj][3], xb[2 * j], xb[2 * j + 1]);
    }
  }
}

// One output y[tok, row] of an fp32 sum: with `partial` (K split) this split's fp32 partial [split, M, N], else + bias,
// rounded to T, into out [M, N].
template <typename T>
__device__ __forceinline__ void store_output(float v, int tok, int row, int M, int N, const T* __restrict__ bias,
                                             T* __restrict__ out, float* __restrict__ partial) {
  if (partial != nullptr) {
    partial[static_cast<int64_t>(blockIdx.y) * M * N + static_cast<int64_t>(tok) * N + row] = v;
    return;
  }
  if (bias != nullptr) v += Ops<T>::to_float(bias[row]);
  out[static_cast<int64_t>(tok) * N + row] = Ops<T>::from_float(v);
}

// Programmatic dependent launch (sm_90+; server.kernels.pdl, LORAPLEX_PDL=0 turns it off): a kernel launched with the
// attribute may start while the kernel ahead of it in the stream finishes, so its launch and its first loads of
// weights (which no kernel of a step writes) overlap that tail. This waits until the kernel ahead has completed and its
// memory is visible, and must come before the kernel's first read of an activation and its first store; then it lets
// the kernel behind this one launch (griddepcontrol.launch_dependents: its blocks take the SMs this kernel's blocks
// leave, and wait there in turn). Triggered only after the wait, so at most one kernel runs ahead, and a kernel's
// completion still implies every kernel's before it. No-ops for a kernel launched without the attribute and before
// sm_90.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Split K: each split's block stores its fp32 partials [split, M, N]; a second kernel (split_k_sum_kernel) sums
// them in split order, adds the bias and stores out. Measured against (H200, 8B shapes, bench.kernels, two calls of
// the eleventh session): the last block of each row group to arrive summing them itself (an atomic arrival count a
// group, reset by that block) lost at every row count. With a fence a thread and one load after another: o at one
// row 9.45 -> 10.0 us, qkv at 16 rows 15.8 -> 20.3 (that block summed 16 splits of 64 x 16 values alone); with one
// fence a block, loads issued together and 1-8 rows only, still gate_up at one row 41.1 against 38.1 for the sum
// kernel, and 8B batch-1 decode 278 against 286 tokens/s: the fence and the count lengthen every block's exit.
constexpr int kUnrolledSplits = 16;  // pick_split_k's largest split

// Sum of the `splits` partials at p, p + plane, ... in split order (loads issued together, then added).
__device__ __forceinline__ float sum_splits(const float* p, int64_t plane, int splits) {
  float part[kUnrolledSplits];
#pragma unroll
  for (int s = 0; s < kUnrolledSplits; ++s) part[s] = s < splits ? __ldcg(p + s * plane) : 0.f;
  float v = 0.f;
#pragma unroll
  for (int s = 0; s < kUnrolledSplits; ++s) {
    if (s < splits) v += part[s];
  }
  for (int s = kUnrolledSplits; s < splits; ++s) v += __ldcg(p + s * plane);
  return v;
}

template <typename T>
__global__ void split_k_sum_kernel(const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ out,
                                   int M, int N, int splits) {
  wait_for_prior_grid();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(M) * N) return;
  float v = sum_splits(partial + i, static_cast<int64_t>(M) * N, splits);
  if (bias != nullptr) v += Ops<T>::to_float(bias[i % N]);
  out[i] = Ops<T>::from_float(v);
}

// C fragment: acc[nt][0..1] = (row g, tokens tok0 + nt*8 + 2t, +1), acc[nt][2..3] = (row g + 8, same tokens); into
// out (+ bias, rounded to T) or, split over K (partial set), into this split's fp32 partials [split, M, N].
template <typename T, int NT>
__device__ __forceinline__ void store_c_fragments(const float (&acc)[NT][4], int row_lo, int t, int tok0, int M, int N,
                                                  const T* __restrict__ bias, T* __restrict__ out,
                                                  float* __restrict__ partial) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = (i < 2) ? row_lo : row_lo + 8;
      const int tok = tok0 + nt * 8 + 2 * t + (i & 1);
      if (row < N && tok < M) store_output<T>(acc[nt][i], tok, row, M, N, bias, out, partial);
    }
  }
}

}  // namespace
