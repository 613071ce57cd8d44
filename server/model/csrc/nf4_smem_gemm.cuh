// NF4 x 16-bit GEMM for prefill-sized batches (65-512 rows): the weights dequantized once a block into shared memory,
// then an ordinary tensor-core GEMM over two shared-memory tiles. Included by nf4_mma.cu (after its cp.async helpers).
//
// Where the wide kernel dequantizes a warp's weights into its own A fragments and re-reads all of x from shared memory
// for every 16 weight rows (~16 bytes of shared-memory reads a weight at 128 rows), here a block of 8 warps owns 128
// weight rows x BM = 32 * MT tokens: the 256 threads dequantize the block's 128 x 64 weights of a quant block once
// (32 each, the fp32 table in shared memory, the same dequant_pair as every other kernel: bit for bit the same
// weights), store them as 16-bit values, and each warp (2 along the tokens x 4 along the weights: 16 * MT tokens x 32
// weight rows) reads its operands with ldmatrix: x as the MMA's A (row major), the weights as its B ("col" major:
// rows of the weight are the MMA's columns). Per quant block a warp issues 4 k-steps x (MT + 2) ldmatrix.x4 and 4 * MT
// MMAs.
//
// Pipeline: x (BM rows of 128 bytes), codes (128 rows of 32 bytes) and scales (128 floats) of a quant block come by
// cp.async SG_STAGES - 1 blocks ahead; the dequantized tile is double-buffered, so that the dequantization of block
// i + 1 and the MMAs of block i run between the same two barriers (one barrier a block). 16-byte chunk c of a
// 128-byte row r sits at c ^ (r & 7) in every tile (x and weights), so ldmatrix's eight row addresses and the
// dequantizer's 16-byte stores touch distinct banks. Rows past M (tokens) or N (weights) re-read the last row and
// are never stored. Split K as the other kernels: grid y, fp32 partials summed by split_k_sum_kernel.
#pragma once

namespace {

constexpr int SG_BN = 128;     // weight rows a block
constexpr int SG_WARPS = 8;    // 2 (tokens) x 4 (weight rows)
constexpr int SG_THREADS = SG_WARPS * 32;
constexpr int SG_STAGES = 4;   // cp.async buffers of x, codes and scales

template <int MT>
struct SmemGemmLayout {
  static constexpr int BM = 32 * MT;                      // tokens a block
  static constexpr int x_bytes = BM * 128;                // BM rows of 64 16-bit values
  static constexpr int codes_bytes = SG_BN * 32;          // 128 rows of 64 nibbles
  static constexpr int scales_bytes = SG_BN * 4;
  static constexpr int stage_bytes = x_bytes + codes_bytes + scales_bytes;
  static constexpr int w_bytes = SG_BN * 128;             // one dequantized tile
  static constexpr int w_offset = SG_STAGES * stage_bytes;
  static constexpr int bytes = w_offset + 2 * w_bytes;
};

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// Byte offset of 16-byte chunk c of 128-byte row r in a swizzled tile.
__device__ __forceinline__ uint32_t swizzled(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

template <typename T, int MT>
__global__ void __launch_bounds__(SG_THREADS, 1) nf4_smem_gemm_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
  using L = SmemGemmLayout<MT>;
  extern __shared__ __align__(128) uint8_t sg_smem[];
  const char* lut = stage_code_table(table);
  const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(sg_smem));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 1, warp_n = warp >> 1;
  const int n0 = blockIdx.x * SG_BN, m0 = blockIdx.z * L::BM;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int count = min(first + blocks_per_split, num_blocks) - first;  // >= 1 (run_split)
  const int64_t code_row_bytes = K / 2;

  // One quant block's x, codes and scales into stage buffer `s` (every thread issues its share, one group).
  auto load_stage = [&](int s, int blk) {
    const uint32_t base = smem + s * L::stage_bytes;
#pragma unroll
    for (int i = 0; i < MT; ++i) {  // BM rows x 8 chunks = MT chunks a thread
      const int q = tid + i * SG_THREADS, row = q >> 3, c = q & 7;
      const T* src = x + static_cast<int64_t>(min(m0 + row, M - 1)) * K + 64 * blk + 8 * c;
      cp_async16(base + swizzled(row, c), src);
    }
    const int row = tid >> 1, half = tid & 1;
    const int n = min(n0 + row, N - 1);
    cp_async16(base + L::x_bytes + row * 32 + half * 16, codes + n * code_row_bytes + 32 * blk + 16 * half);
    if (tid < SG_BN) {
      const int64_t nn = min(n0 + tid, N - 1);
      cp_async4(base + L::x_bytes + L::codes_bytes + tid * 4, absmax + nn * num_blocks + blk);
    }
  };

  // Dequantize stage `s`'s codes into tile buffer `b`: thread (row, half) writes 32 weights, 4 chunks of its row.
  auto dequantize = [&](int s, int b) {
    const uint8_t* stage = sg_smem + s * L::stage_bytes;
    const int row = tid >> 1, half = tid & 1;
    const uint4 cw = *reinterpret_cast<const uint4*>(stage + L::x_bytes + row * 32 + half * 16);
    const float scale = *reinterpret_cast<const float*>(stage + L::x_bytes + L::codes_bytes + row * 4);
    uint8_t* tile = sg_smem + L::w_offset + b * L::w_bytes;
    const uint32_t words[4] = {cw.x, cw.y, cw.z, cw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t hi = (words[j] >> 2) & 0x3C3C3C3Cu, lo = (words[j] << 2) & 0x3C3C3C3Cu;
      uint4 v;
      v.x = dequant_pair<T>(lut, hi, lo, 0, scale);
      v.y = dequant_pair<T>(lut, hi, lo, 1, scale);
      v.z = dequant_pair<T>(lut, hi, lo, 2, scale);
      v.w = dequant_pair<T>(lut, hi, lo, 3, scale);
      *reinterpret_cast<uint4*>(tile + swizzled(row, 4 * half + j)) = v;
    }
  };

  float acc[MT][4][4] = {};
  // The MMAs of one quant block: x from stage `s`, weights from tile buffer `b`.
  auto multiply = [&](int s, int b) {
    const uint32_t xs = smem + s * L::stage_bytes;
    const uint32_t ws = smem + L::w_offset + b * L::w_bytes;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_m * MT * 16 + mt * 16 + (lane & 15);
        ldmatrix_x4(xs + swizzled(row, 2 * kk + (lane >> 4)), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int j = lane >> 3;
        const int row = warp_n * 32 + p * 16 + (j >> 1) * 8 + (lane & 7);
        ldmatrix_x4(ws + swizzled(row, 2 * kk + (j & 1)), bf[2 * p][0], bf[2 * p][1], bf[2 * p + 1][0],
                    bf[2 * p + 1][1]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          Ops<T>::mma(acc[mt][nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], bf[nt][0], bf[nt][1]);
    }
  };

#pragma unroll
  for (int s = 0; s < SG_STAGES - 1; ++s) {
    if (s < count) load_stage(s, first + s);
    cp_async_commit();  // one group a block, empty or not, so that wait_group counts blocks
  }
  cp_async_wait<SG_STAGES - 2>();
  __syncthreads();
  dequantize(0, 0);
  for (int i = 0; i < count; ++i) {
    // Block i's tile is whole (dequantized by all before this barrier) and block i + 1's stage has landed; the stage
    // refilled below held block i - 1 (its MMAs and its dequantization are behind the barrier).
    cp_async_wait<SG_STAGES - 3>();
    __syncthreads();
    if (i + SG_STAGES - 1 < count) load_stage((i + SG_STAGES - 1) % SG_STAGES, first + i + SG_STAGES - 1);
    cp_async_commit();
    if (i + 1 < count) dequantize((i + 1) % SG_STAGES, (i + 1) & 1);
    multiply(i % SG_STAGES, i & 1);
  }
  cp_async_wait<0>();

  // C fragment of (mt, nt): registers 0, 1 token g, weight rows 2t, 2t + 1; registers 2, 3 token g + 8, same rows.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = m0 + warp_m * MT * 16 + mt * 16 + g + (i >= 2 ? 8 : 0);
        const int row = n0 + warp_n * 32 + nt * 8 + 2 * t + (i & 1);
        if (tok < M && row < N) store_output<T>(acc[mt][nt][i], tok, row, M, N, bias, out, partial);
      }
}

}  // namespace
