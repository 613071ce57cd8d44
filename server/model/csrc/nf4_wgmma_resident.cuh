// The warpgroup-MMA kernel with x resident in shared memory (sm_90a; opt-in until timed: nf4_wgmma's
// resident_warpgroups). Included by nf4_wgmma.cu after nf4_wgmma.cuh, whose x layout, A fragments and wgmmas it
// reuses.
//
// Why. nf4_wgmma_kernel stages x a quant block at a time: every stage loads the next block's x, stores it permuted
// and meets the block's other warps at a barrier, and the grid is one block of two warpgroups a 128-row group, so
// 8B gate_up at 32 rows runs 224 blocks on 132 SMs (13.6 warps an SM). What a stage costs adds up rather than
// overlaps (H100, 8B gate_up at 32 rows, bench.wgmma_sol: the code loads alone 33.6 of the kernel's 48 us, x and the
// barrier 6, the dequantization 7, the MMAs 4), and the loads are bound by the bytes a warp has in flight (ncu: one
// quant block, 576 bytes, a warp; bench/NOTES.md, fortieth session). Splitting K for more warps lost to the uneven
// waves it made (448 blocks of 3 an SM: 1.13 waves).
//
// What. One block an SM holds x of its split of K (BM tokens x the split's quant blocks: 4 KB a block at 32 tokens,
// up to 55 blocks), stored once at the start in nf4_wgmma_kernel's permuted, swizzled tile layout, one tile a quant
// block. Its WGS warpgroups then walk 64-row groups (units) of the weight independently: unit u of the split goes to
// warpgroup u % (blocks x WGS) of the split's blocks, so a grid of splits x blocks spreads units x splits over every
// SM's warpgroups (8B gate_up: 2 splits x 66 blocks x 7 warpgroups = 924 slots for 896 units, one wave of 28 warps
// an SM). No block barrier after x's: a warpgroup's stages wait only on their own loads and wgmmas. A warp's codes
// come one stage ahead in a two-slot register ring with one wait a stage (nf4_wgmma_kernel's one-wait step), across
// units: the last stage of a unit loads the first block of the next. Each unit's accumulators go to out (one split)
// or to its split's fp32 partials, as nf4_wgmma_kernel's do; each warpgroup issues the same wgmmas in the same order
// for a unit: the same bits as nf4_wgmma with the same splits.
#pragma once

#include <type_traits>

namespace {

// A block's dynamic shared memory at most: an SM's 227 KB a block (sm_90) less room for the static code table
constexpr int kResidentSmemMax = 226 * 1024;

// Dynamic shared memory of a resident block: x's tiles for `blocks` quant blocks of BM tokens, 1,024-byte aligned.
__host__ __device__ constexpr int resident_smem_bytes(int bm, int blocks) { return blocks * bm * 128 + 1024; }

template <typename T, int BM, int WGS>
__global__ void __launch_bounds__(WGS * 128, 1) nf4_wgmma_resident_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  constexpr int THREADS = WGS * 128;
  constexpr int TILE_BYTES = BM * 128;  // x of one quant block
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem));
  const uint32_t tiles = (raw + 1023) & ~1023u;
  uint8_t* tiles_ptr = wg_smem + (tiles - raw);
  const char* lut = stage_code_table(table);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row_tiles = (N + 15) / 16;
  const int units = (row_tiles + 3) / 4;
  const int num_blocks = K / 64;
  const int first = blockIdx.y * blocks_per_split;
  const int last = min(first + blocks_per_split, num_blocks);
  const int m0 = blockIdx.z * BM;
  const int stride = gridDim.x * WGS;
  int unit = blockIdx.x * WGS + (warp >> 2);

  // Codes and scales of (unit u, block blk) for this warp's 16-row tile (a tile past the last re-reads the last);
  // `z` is 0, computed from registers loaded before, so that the loads issue after them.
  const uint4* codes_at = tile_codes + lane;
  const float2* scales_at = tile_scales + (lane >> 2);
  auto block_at = [&](int u, int blk) {
    return static_cast<int64_t>(min(4 * u + (warp & 3), row_tiles - 1)) * num_blocks + blk;
  };
  uint4 ring_codes[2];
  float2 ring_scales[2];
  {  // the first stage's, issued before x's staging so that their DRAM latency overlaps it
    const int64_t b = block_at(min(unit, units - 1), first);
    ring_codes[0] = load_tile_codes(codes_at + 32 * b);
    ring_scales[0] = __ldg(scales_at + 8 * b);
  }

  // x of the split, 16-byte chunk q of quant block q / (BM * 8): XStage's mapping, four chunks a thread in flight
  const int chunks = (last - first) * BM * 8;
  for (int q0 = threadIdx.x; q0 < chunks; q0 += 4 * THREADS) {
    uint4 v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = min(q0 + i * THREADS, chunks - 1);
      const int row = (q >> 3) % BM, c = q & 7;
      v[i] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(m0 + row, M - 1)) * K +
                                                  64 * (first + q / (BM * 8)) + 8 * c));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = q0 + i * THREADS;
      if (q < chunks) store_x_chunk(tiles_ptr + q / (BM * 8) * TILE_BYTES, (q >> 3) % BM, q & 7, v[i]);
    }
  }
  fence_proxy_async_smem();
  __syncthreads();  // x stored and fenced by all; no block barrier after this one
  if (unit >= units) return;

  const uint32_t zero = static_cast<uint32_t>(K) >> 31;  // 0 (K > 0), which the compiler cannot know
  const uint64_t x_desc0 = smem_desc_sw128(tiles);
  float acc[BM / 2] = {};
  int blk = first;
  // One stage, its codes in slot P (stages alternate slots: constant indices keep the ring in registers); whether it
  // was the warpgroup's last.
  auto stage = [&](auto slot) {
    constexpr int P = decltype(slot)::value;
    const uint4 codes = ring_codes[P];
    const float2 scales = ring_scales[P];
    const uint32_t z = (codes.x ^ __float_as_uint(scales.x)) & zero;
    int next_unit = unit, next_blk = blk + 1;
    if (next_blk == last) {
      next_blk = first;
      next_unit += stride;
    }
    const bool done = next_unit >= units;
    {  // the next stage's codes (none left: a re-read of this one's, never used)
      const int64_t b = done ? block_at(unit, blk) : block_at(next_unit, next_blk);
      ring_codes[1 - P] = load_tile_codes(codes_at + 32 * b + z);
      ring_scales[1 - P] = __ldg(scales_at + 8 * b + z);
    }
    uint32_t a[1][2][2][4];
    a_fragments<T>(lut, codes, scales, 0, a[0][0]);
    a_fragments<T>(lut, codes, scales, 1, a[0][1]);
    stage_wgmmas<T, BM, 1>(acc, a, smem_desc_advance(x_desc0, (blk - first) * TILE_BYTES), blk, last);
    if (next_blk == first) {  // the unit's last block: its sums out, the next unit's from zero
      store_accumulators<T, BM>(acc, 4 * unit + (warp & 3), row_tiles, g, t, m0, M, N, bias, out, partial);
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
    }
    unit = next_unit;
    blk = next_blk;
    return done;
  };
  while (!stage(std::integral_constant<int, 0>()) && !stage(std::integral_constant<int, 1>())) {
  }
#endif
}

}  // namespace
