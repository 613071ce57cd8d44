// The warpgroup-MMA kernel with x resident in shared memory (sm_90a; start-up tuning candidates: nf4_wgmma's
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
// What. One block an SM holds x of its split of K (BM tokens x the split's quant blocks: 4 KB a block at 32 tokens, up
// to 55 blocks, or 39 beside the byte-pair table), stored once at the start in nf4_wgmma_kernel's permuted, swizzled
// tile layout, one tile a quant block. Its WGS warpgroups then walk 64-row groups (units) of the weight independently:
// unit u of the split goes to warpgroup u % (blocks x WGS) of the split's blocks, so a grid of splits x blocks spreads
// units x splits over every SM's warpgroups (8B gate_up: 2 splits x 66 blocks x 7 warpgroups = 924 slots for 896 units,
// one wave of 28 warps an SM). No block barrier after x's: a warpgroup's stages wait only on their own loads and
// wgmmas. A warp's codes come one stage ahead in a two-slot register ring with one wait a stage (nf4_wgmma_kernel's
// one-wait step), across units: the last stage of a unit loads the first block of the next. Each unit's accumulators go
// to out (one split) or to its split's fp32 partials, as nf4_wgmma_kernel's do; each warpgroup issues the same wgmmas
// in the same order for a unit: the same bits as nf4_wgmma with the same splits. The dequantization reads the 16-entry
// table or (PAIRS) the byte-pair table (5 instructions a weight pair where the 16-entry table's take 8), which one
// block an SM has room for: 64 KB once an SM.
//
// Measured (H100, 8B gate_up at 32 rows, ncu; bench/NOTES.md, forty-first session): the first build kept the SMs
// busier than the default kernel (issue slots 72% against 46%) but ran 44% more instructions (33.0M against 23.0M: an
// add of the table's base every table load, 64-bit address arithmetic and descriptors rebuilt a stage, x's staging);
// hence TableAt, the added addresses, descriptors from their low word and x staged by whole blocks. Measured slower and
// removed (H100, forty-second session; design in ef051e7): a code ring 2-3 quant blocks ahead at 4-6 warpgroups (the
// registers allow no more), faster than one ahead at 4 warpgroups (8B gate_up at 16 rows 35.9 against 39.3 us) but
// never than 7 warpgroups one ahead (34.5; at 32 rows 47.9 against 42.0): more warps beat more loads in flight
// (bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s42-ahead.json).
#pragma once

#include <algorithm>
#include <type_traits>

#include "nf4_wgmma_bulk.cuh"

namespace {

// RING > 0 only (bench/resident_ring.py's probe; nothing of the server's): the bytes the ring's bulk copies walk, set
// by the probe before its launches
__device__ const uint8_t* g_ring_src = nullptr;
__device__ uint64_t g_ring_src_bytes = 0;

// The ring's slots for RING bytes a copy: as many as 12 KB hold (down's 32-token block leaves ~14 KB beside x and the
// table), 2 to 8. A copy waits only for the one ring_slots copies before it (about that many stages of ~1 us: room
// for a DRAM round trip; the first form's two slots, run in the fifty-fifth session, likely made warpgroup 0 wait for
// each copy two stages later, which the probe then timed instead of the shared memory's traffic).
__host__ __device__ constexpr int ring_slots(int ring) {
  return ring <= 0 ? 0 : (12288 / ring < 2 ? 2 : (12288 / ring > 8 ? 8 : 12288 / ring));
}

// The ring at the top of the block's dynamic shared memory (the probe's launch adds ring_slots x RING + 256 bytes to
// the server's): the copy count and the launch's epoch at `state`, the slots' mbarriers 16 + 8 s bytes past it, the
// slots below it. Every address is derived again from %dynamic_smem_size at each use, so the ring holds no register
// across the walk.
template <int RING>
struct RingAt {
  static constexpr int kSlots = ring_slots(RING);
  uint32_t state, slots;
  __device__ __forceinline__ explicit RingAt(uint32_t window) {
    uint32_t size;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
    state = (window + size - 128) & ~15u;
    slots = (state & ~127u) - kSlots * RING;
  }
  __device__ __forceinline__ uint32_t bar(uint32_t slot) const { return state + 16 + 8 * slot; }
};

template <int RING>
__device__ __forceinline__ void ring_init(uint32_t window) {
  const RingAt<RING> at(window);
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  // the launch's epoch (the clock in 4-us steps, 1 ns a tick) beside the count: each launch walks other bytes of the
  // source, so that a replayed graph's copies come from DRAM as a step's LoRA pool would, not from the L2
  asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(at.state), "r"(0u), "r"(static_cast<uint32_t>(now >> 12))
               : "memory");
  for (int s = 0; s < RingAt<RING>::kSlots; ++s) mbarrier_init(at.bar(s), 1);
  mbarrier_init_fence();
}

// Copy n (the state's count) into slot n % kSlots, after waiting for that slot's copy n - kSlots
template <int RING>
__device__ __forceinline__ void ring_step(uint32_t window) {
  constexpr uint32_t kSlots = RingAt<RING>::kSlots;
  const RingAt<RING> at(window);
  uint32_t n, epoch;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(n), "=r"(epoch) : "r"(at.state) : "memory");
  const uint32_t slot = n % kSlots;
  if (n >= kSlots) mbarrier_wait_parity(at.bar(slot), ((n / kSlots) - 1) & 1);
  const uint64_t block = (static_cast<uint64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  // copy n of block b of the launch of epoch e: copy (e x 2^16 + b x 2^8 + n) of the source, which (a multiple of
  // RING bytes) it wraps
  const uint64_t offset = ((static_cast<uint64_t>(epoch) << 16) + block * 256 + n) * RING % g_ring_src_bytes;
  mbarrier_arrive_expect_tx(at.bar(slot), RING);
  bulk_copy_to_shared(at.slots + slot * RING, g_ring_src + offset, RING, at.bar(slot));
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(at.state), "r"(n + 1) : "memory");  // the count; the epoch stays
}

// The last kSlots copies landed, before the block's shared memory goes
template <int RING>
__device__ __forceinline__ void ring_drain(uint32_t window) {
  constexpr uint32_t kSlots = RingAt<RING>::kSlots;
  const RingAt<RING> at(window);
  uint32_t n;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(n) : "r"(at.state) : "memory");  // the count
  for (uint32_t i = n > kSlots ? n - kSlots : 0; i < n; ++i) {
    mbarrier_wait_parity(at.bar(i % kSlots), (i / kSlots) & 1);
  }
}

// A block's dynamic shared memory at most: an SM's 227 KB a block (sm_90), less 1 KB
constexpr int kResidentSmemMax = 226 * 1024;
// With the byte-pair table (PAIRS): x's tiles of BM tokens below the table, from the window's first 1,024-byte boundary
// past its reserved 1 KB up to kPairsTableWindow (15 at 32 tokens), and past it
__host__ __device__ constexpr int resident_low_tiles(int bm) {
  return (static_cast<int>(kPairsTableWindow) - 1024) / (bm * 128);
}

// Dynamic shared memory of a resident block for `blocks` quant blocks of x at BM tokens, 1,024-byte aligned: the
// 16-entry table's 1,024 bytes then x's tiles; or (PAIRS) x's first resident_low_tiles tiles, the 64 KB pair table at
// kPairsTableWindow and the other tiles past it.
__host__ __device__ constexpr int resident_smem_bytes(int bm, int blocks, bool pairs = false) {
  return pairs ? (pairs_table_end() + 1023) / 1024 * 1024 - 1024 +
                     (blocks > resident_low_tiles(bm) ? (blocks - resident_low_tiles(bm)) * bm * 128 : 0)
               : blocks * bm * 128 + 2048;
}

// The resident kernel's grid for x [M, K] and N outputs in `splits` splits of K: as many blocks of WGS warpgroups a
// split and token group as its units of 4 row tiles need, but one wave over the SMs (one block an SM)
inline dim3 resident_grid(int M, int N, int bm, int wgs, int splits, int num_sms) {
  const int units = ((N + 15) / 16 + 3) / 4, token_groups = (M + bm - 1) / bm;
  return dim3(std::max(1, std::min((units + wgs - 1) / wgs, num_sms / (splits * token_groups))), splits, token_groups);
}

// RING (0 in every server instance): a probe of what a LoRA shrink whose pool tiles come by the TMA unit would cost
// beside the dequantization (bench/NOTES.md, fifty-fourth session), NOT the semantics of anything: thread 0 brings
// RING bytes of g_ring_src by one bulk copy a stage of its warpgroup's walk into one of ring_slots(RING) shared-memory
// slots at the top of the block's dynamic shared memory (RingAt; waiting for that slot's copy ring_slots stages
// before), and nothing reads them.
template <typename T, int BM, int WGS, bool PAIRS = false, int RING = 0>
__global__ void __launch_bounds__(WGS * 128, 1) nf4_wgmma_resident_kernel(
    const T* __restrict__ x, const uint4* __restrict__ tile_codes, const float2* __restrict__ tile_scales,
    const float* __restrict__ table, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
    int M, int N, int K, int blocks_per_split) {
#ifdef LORAPLEX_WGMMA
  constexpr int THREADS = WGS * 128;
  constexpr int TILE_BYTES = BM * 128;  // x of one quant block
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t window = static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem));
  const uint32_t aligned = (window + 1023) & ~1023u;
  // x's tiles: the first low_tiles from shared address low, the rest from high (stage_x, desc_at)
  uint32_t low, high;
  int low_tiles;
  if constexpr (PAIRS) {  // the pair table at kPairsTableWindow (its address bytes 2-3 are load_pair_at's permute's)
    low = aligned;
    low_tiles = static_cast<int>(kPairsTableWindow - aligned) / TILE_BYTES;
    high = (pairs_table_end() + 1023) & ~1023;
    if (low_tiles < resident_low_tiles(BM)) __trap();  // more static shared memory than resident_smem_bytes planned
    stage_pair_table(table, reinterpret_cast<char*>(wg_smem + (kPairsTableWindow - window)));
  } else {  // the 16-entry table in the first 1,024 bytes (aligned: its address bytes 1-3 are the permute's, TableAt)
    low = high = aligned + 1024;
    low_tiles = 0;
    if (threadIdx.x < 16) reinterpret_cast<float*>(wg_smem + (aligned - window))[threadIdx.x] = table[threadIdx.x];
  }

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

  // The codes and scales of block `first` of unit u for this warp's 16-row tile (a tile past the last re-reads the
  // last); a unit's next blocks follow 32 uint4 and 8 float2 on.
  const int tile_in_unit = warp & 3;
  auto unit_codes = [&](int u) {
    const int tile = min(4 * u + tile_in_unit, row_tiles - 1);
    return tile_codes + lane + (static_cast<int64_t>(tile) * num_blocks + first) * 32;
  };
  auto unit_scales = [&](int u) {
    const int tile = min(4 * u + tile_in_unit, row_tiles - 1);
    return tile_scales + (lane >> 2) + (static_cast<int64_t>(tile) * num_blocks + first) * 8;
  };
  const uint4* codes_at = unit_codes(min(unit, units - 1));  // the current stage's block
  const float2* scales_at = unit_scales(min(unit, units - 1));
  uint4 ring_codes[2];
  float2 ring_scales[2];
  // the first stage's, issued before x's staging so that their DRAM latency overlaps it
  ring_codes[0] = load_tile_codes(codes_at);
  ring_scales[0] = __ldg(scales_at);
  wait_for_prior_grid();  // x is the kernel ahead's output

  // x of the split, quant blocks [q0, q1) into the tiles from shared address `at`, one region at a time (choosing the
  // region a chunk took ~4x the instructions): the first STAGERS threads stage whole quant blocks at once (XStage's
  // chunk q = thread % (BM * 8) of block thread / (BM * 8), then every AT_ONCE blocks on), four chunks a thread in
  // flight. (Tiles of 64 and 128 tokens, where a block's x has as many chunks as the block threads or more, measured
  // slower than nf4_wgmma_kernel at 33-128 rows and were removed: bench/NOTES.md, forty-second session.)
  static_assert(THREADS >= BM * 8, "a block's threads stage at least one quant block of x at once");
  constexpr int AT_ONCE = THREADS / (BM * 8);
  constexpr int STAGERS = AT_ONCE * BM * 8;
  auto stage_x = [&](int q0, int q1, uint32_t at) {
    const int row = (threadIdx.x >> 3) % BM, c = threadIdx.x & 7, kb0 = q0 + threadIdx.x / (BM * 8);
    const T* src = x + static_cast<int64_t>(min(m0 + row, M - 1)) * K + 64 * (first + kb0) + 8 * c;
    uint8_t* dst = wg_smem + (at - window) + (kb0 - q0) * TILE_BYTES;
    for (int kb = kb0; kb < q1; kb += 4 * AT_ONCE) {
      uint4 v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (kb + i * AT_ONCE < q1) v[i] = __ldg(reinterpret_cast<const uint4*>(src + 64 * AT_ONCE * i));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (kb + i * AT_ONCE < q1) store_x_chunk(dst + AT_ONCE * TILE_BYTES * i, row, c, v[i]);
      }
      src += 4 * 64 * AT_ONCE;
      dst += 4 * AT_ONCE * TILE_BYTES;
    }
  };
  if (threadIdx.x < STAGERS) {
    const int split_low = min(low_tiles, last - first);
    if (split_low > 0) stage_x(0, split_low, low);
    stage_x(split_low, last - first, high);
  }
  if constexpr (RING > 0) {
    if (threadIdx.x == 0) ring_init<RING>(window);
  }
  fence_proxy_async_smem();
  __syncthreads();  // the table and x stored (x fenced) by all; no block barrier after this one
  if (unit >= units) return;
  uint32_t pair_reg = kPairsTableWindow | pair_copy_offset();
  asm volatile("" : "+r"(pair_reg));  // after the barrier: every table load's address depends on it
  const TableAt lut{aligned};

  const uint32_t zero = static_cast<uint32_t>(K) >> 31;  // 0 (K > 0), which the compiler cannot know
  // quant block i's tile: + i * TILE_BYTES / 16 from low's, or past the low tiles from high's
  const uint32_t low_desc = smem_desc_sw128_lo(low);
  const uint32_t high_desc = smem_desc_sw128_lo(high) - low_tiles * (TILE_BYTES >> 4);
  auto desc_at = [&](int i) { return (i < low_tiles ? low_desc : high_desc) + i * (TILE_BYTES >> 4); };
  float acc[BM / 2] = {};
  // One stage: the block in ring slot P (stages alternate slots: constant indices keep the ring in registers) at x's
  // tile x_desc_lo (its descriptor's low word); the next block's loads issued first (the unit's, by an add, or at the
  // unit's end the next unit's first block: none left, a clamped re-read, never used).
  auto stage = [&](auto slot, uint32_t x_desc_lo, bool unit_end) {
    constexpr int P = decltype(slot)::value;
    const uint4 codes = ring_codes[P];
    const float2 scales = ring_scales[P];
    const uint32_t z = (codes.x ^ __float_as_uint(scales.x)) & zero;
    if (unit_end) {
      codes_at = unit_codes(min(unit + stride, units - 1));
      scales_at = unit_scales(min(unit + stride, units - 1));
    } else {
      codes_at += 32;
      scales_at += 8;
    }
    ring_codes[1 - P] = load_tile_codes(codes_at + z);
    ring_scales[1 - P] = __ldg(scales_at + z);
    if constexpr (RING > 0) {
      if (threadIdx.x == 0) ring_step<RING>(window);
    }
    uint32_t a[1][2][2][4];
    if constexpr (PAIRS) {
      a_fragments_pairs_at<T>(pair_reg, codes, scales, 0, a[0][0]);
      a_fragments_pairs_at<T>(pair_reg, codes, scales, 1, a[0][1]);
    } else {
      a_fragments<T>(lut, codes, scales, 0, a[0][0]);
      a_fragments<T>(lut, codes, scales, 1, a[0][1]);
    }
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) Wgmma<T, BM>::mma(acc, a[0][j / 2][j % 2], smem_desc_from_lo(x_desc_lo + 2 * j));
    wgmma_commit();
    wgmma_wait_all();  // before the next stage's dequantization rewrites a
  };
  // A unit's stages, two a loop (the first in slot S), then its sums out; after an odd count of blocks the next unit
  // starts in the other slot
  auto walk_unit = [&](auto first_slot) {
    constexpr int S = decltype(first_slot)::value;
    const int n = last - first;
    for (int i = 0; i < n; i += 2) {
      stage(std::integral_constant<int, S>(), desc_at(i), i + 1 == n);
      if (i + 1 == n) break;
      stage(std::integral_constant<int, 1 - S>(), desc_at(i + 1), i + 2 == n);
    }
    store_accumulators<T, BM>(acc, 4 * unit + tile_in_unit, row_tiles, g, t, m0, M, N, bias, out, partial);
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
  };
  for (bool odd = false; unit < units; unit += stride) {  // odd: this unit starts in slot 1
    if (odd) {
      walk_unit(std::integral_constant<int, 1>());
    } else {
      walk_unit(std::integral_constant<int, 0>());
    }
    odd ^= (last - first) & 1;
  }
  if constexpr (RING > 0) {
    if (threadIdx.x == 0) ring_drain<RING>(window);
  }
#endif
}

}  // namespace
