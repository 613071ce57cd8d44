// The top-p radix passes and the draw of server/engine/triton_top_p.py in CUDA: the same buffers, the same
// integers, bit for bit (tests/gpu/test_sampler_gpu.py compares every buffer with the Triton kernels').
//
// Why: Triton has no scatter-add into shared memory, so its histogram pass accumulates a [128 tokens, 32
// digits] int64 one-hot per block of tokens, ~160 integer operations a token: 60 us a full pass over 32 x
// 128256 tokens on the H200, 362 of a top-p draw's 459 us (bench/NOTES.md, fourteenth session). Here each
// thread runs the masses of its tokens into one register while their digit repeats (the first passes over a
// nearly flat row see one digit) and adds the run into its warp's histogram in shared memory when the digit
// changes. And the draw's one scanning program walks its 4,096 tokens with all of its threads at once (a
// block-wide prefix sum) instead of 32 steps of 128.
//
// Built by server/engine/cuda_top_p.py with nvcc into a plain shared library (no torch headers: a few seconds
// to build), launched through ctypes on the caller's stream, so CUDA graphs capture it like any kernel.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kDigitBits = 5;  // triton_top_p.DIGIT_BITS
constexpr int kDigits = 1 << kDigitBits;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxChunks = 256;  // chunks a row (vocab / chunk size); the wrappers refuse more
constexpr double kMassScale = 1099511627776.0;  // 2**40: sampling_masses.MASS_BITS

__device__ __forceinline__ long long mass_of(float p) {
  return static_cast<long long>(floor(static_cast<double>(p) * kMassScale));
}

__device__ __forceinline__ long long need_of(float top_p) {
  // a row without top-p (NO_TOP_P, any value above 1) keeps every token (triton_top_p._need)
  return top_p > 1.0f ? (1LL << 62) : static_cast<long long>(ceil(static_cast<double>(top_p) * kMassScale));
}

// Exclusive prefix sum over the block's threads (every thread must call it); `total` gets the block's sum.
__device__ long long block_exclusive_scan(long long value, long long* warp_sums, long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const long long up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  long long before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += warp_sums[w];
    sum += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused by the caller's next scan
  *total = sum;
  return before + inclusive - value;
}

__device__ __forceinline__ long long warp_sum(long long value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

struct Settled {
  int prefix;           // the new prefix (-1: keep every token)
  long long above;      // this chunk's mass above it
  long long at_digit;   // this chunk's mass at the chosen digit
};

// After the pass whose digit sits at bit `shift` (triton_top_p._settle): the new prefix is the old one with the
// largest digit whose mass from the top, plus the mass above the old prefix (every chunk's, above_in), reaches
// need; -1 when none does. A chunk's new mass above is its old one plus its digits over the chosen one. Every
// thread calls it; the block's threads each add digit `lane` of every eighth chunk, then warp 0 (lane = digit)
// settles. Uses shared memory; returns the same to every thread.
__device__ Settled settle(const float* __restrict__ top_p, const long long* __restrict__ stats_in,
                          const int* __restrict__ prefix_in, const long long* __restrict__ above_in, int row,
                          int chunk, int num_chunks, int shift) {
  __shared__ long long digit_mass[kWarps][kDigits];
  __shared__ Settled settled;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long row_chunk0 = static_cast<long long>(row) * num_chunks;
  const long long* row_stats = stats_in + row_chunk0 * kDigits;
  long long partial = 0;
  for (int c = warp; c < num_chunks; c += kWarps) partial += row_stats[c * kDigits + lane];
  digit_mass[warp][lane] = partial;
  __syncthreads();
  if (warp == 0) {
    long long above_part = 0;
    for (int c = lane; c < num_chunks; c += 32) above_part += above_in[row_chunk0 + c];
    long long from_top = 0;  // the mass at digits >= lane
    for (int w = 0; w < kWarps; ++w) from_top += digit_mass[w][lane];
    for (int offset = 1; offset < 32; offset <<= 1) {
      const long long below = __shfl_down_sync(0xffffffffu, from_top, offset);
      if (lane + offset < 32) from_top += below;
    }
    const long long need = need_of(top_p[row]);
    const unsigned reaches = __ballot_sync(0xffffffffu, warp_sum(above_part) + from_top >= need);
    const int digit = reaches ? 31 - __clz(reaches) : -1;
    const long long mine = row_stats[static_cast<long long>(chunk) * kDigits + lane];
    const long long mine_above = warp_sum(lane > digit ? mine : 0);
    const long long mine_at = warp_sum(lane == digit ? mine : 0);
    if (lane == 0) {
      const int old_prefix = prefix_in[row];
      settled.prefix = (old_prefix < 0 || digit < 0) ? -1 : (old_prefix | (digit << shift));
      settled.above = above_in[row_chunk0 + chunk] + mine_above;
      settled.at_digit = mine_at;
    }
  }
  __syncthreads();
  return settled;
}

// One radix pass, program (row, chunk): settle the previous pass's digit from every chunk's histogram (not on
// the first pass), then the chunk's mass histogram over the digit at `shift` of its tokens that share the
// prefix. As triton_top_p._histogram_kernel, with the same buffers.
__global__ void __launch_bounds__(kThreads) histogram_pass_kernel(
    const float* __restrict__ probs, const float* __restrict__ top_p, const long long* __restrict__ stats_in,
    const int* __restrict__ prefix_in, const long long* __restrict__ above_in, long long* __restrict__ stats,
    int* __restrict__ prefix_out, long long* __restrict__ above_out, int vocab, long long stride,
    int num_chunks, int chunk_size, int shift, int first) {
  const int row = blockIdx.x, chunk = blockIdx.y, tid = threadIdx.x, warp = tid >> 5;
  __shared__ unsigned long long hist[kWarps][kDigits];
  for (int i = tid; i < kWarps * kDigits; i += kThreads) (&hist[0][0])[i] = 0;
  const long long row_chunk0 = static_cast<long long>(row) * num_chunks;
  int prefix = 0;
  long long above = 0;
  if (first) {
    __syncthreads();
  } else {
    const Settled settled = settle(top_p, stats_in, prefix_in, above_in, row, chunk, num_chunks,
                                   shift + kDigitBits);
    prefix = settled.prefix;
    above = settled.above;
  }
  if (tid == 0) {
    if (chunk == 0) prefix_out[row] = prefix;
    above_out[row_chunk0 + chunk] = above;
  }
  // The tokens that share the prefix (a prefix of -1 matches none), each thread every kThreads-th of the chunk:
  // the mass of a run of one digit stays in a register until the digit changes.
  const float* row_probs = probs + static_cast<long long>(row) * stride;
  const int start = chunk * chunk_size;
  const int end = min(start + chunk_size, vocab);
  const int high = shift + kDigitBits;
  const int wanted = prefix >> min(high, 31);
  int current = -1;
  unsigned long long run = 0;
  for (int t = start + tid; t < end; t += kThreads) {
    const float p = row_probs[t];
    const int bits = __float_as_int(p);
    if (first || (bits >> high) == wanted) {
      const int digit = (bits >> shift) & (kDigits - 1);
      const unsigned long long mass = static_cast<unsigned long long>(mass_of(p));
      if (digit != current) {
        if (current >= 0) atomicAdd(&hist[warp][current], run);
        current = digit;
        run = mass;
      } else {
        run += mass;
      }
    }
  }
  if (current >= 0) atomicAdd(&hist[warp][current], run);
  __syncthreads();
  if (tid < kDigits) {
    unsigned long long sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += hist[w][tid];
    stats[(row_chunk0 + chunk) * kDigits + tid] = static_cast<long long>(sum);
  }
}

// The cut, settled from the last pass, and per chunk from the carried masses alone: the mass above the cut and
// the ties at it (tokens whose pattern is the cut, all of one mass: their count is the chunk's mass at the last
// digit over that mass). As triton_top_p._cut_stats_kernel.
__global__ void __launch_bounds__(kThreads) cut_stats_kernel(
    const float* __restrict__ top_p, const long long* __restrict__ stats_in, const int* __restrict__ prefix_in,
    const long long* __restrict__ above_in, int* __restrict__ cut_out, long long* __restrict__ chunk_stats,
    int num_chunks) {
  const int row = blockIdx.x, chunk = blockIdx.y;
  const Settled settled = settle(top_p, stats_in, prefix_in, above_in, row, chunk, num_chunks, 0);
  if (threadIdx.x != 0) return;
  const int cut = settled.prefix;
  if (chunk == 0) cut_out[row] = cut;
  const long long unit = mass_of(__int_as_float(max(cut, 0)));  // every tie has this mass
  const long long out = (static_cast<long long>(row) * num_chunks + chunk) * 2;
  chunk_stats[out] = settled.above;
  chunk_stats[out + 1] = (cut >= 0 && unit > 0) ? settled.at_digit / unit : 0;
}

// The draw, program (row, chunk): kept are every p above the cut and, of the ties at it, the lowest ids, as
// many as the mass still needed takes; the first kept token whose running mass exceeds floor(u * kept mass)
// is drawn by the program whose chunk holds that mass. As triton_top_p._draw_kernel.
__global__ void __launch_bounds__(kThreads) draw_kernel(
    const float* __restrict__ probs, const float* __restrict__ top_p, const float* __restrict__ uniform,
    const int* __restrict__ cut_ptr, const long long* __restrict__ chunk_stats, long long* __restrict__ out,
    int vocab, long long stride, int num_chunks, int chunk_size) {
  const int row = blockIdx.x, chunk = blockIdx.y, tid = threadIdx.x;
  __shared__ long long warp_sums[kWarps];
  __shared__ long long my_start, my_ties_before, allowed_ties, target;
  __shared__ int is_target;
  const int cut = cut_ptr[row];
  const long long row_chunk0 = static_cast<long long>(row) * num_chunks;
  if (tid == 0) {
    long long above = 0;
    for (int c = 0; c < num_chunks; ++c) above += chunk_stats[(row_chunk0 + c) * 2];
    const long long unit = mass_of(__int_as_float(max(cut, 0)));  // every tie has this mass
    const long long need = need_of(top_p[row]);
    const long long allowed = unit > 0 ? (need - above + unit - 1) / unit : (1LL << 40);
    long long ties_before = 0, start = 0, mine_start = 0, mine_kept = 0, mine_ties_before = 0;
    for (int c = 0; c < num_chunks; ++c) {
      const long long above_c = chunk_stats[(row_chunk0 + c) * 2];
      const long long ties_c = chunk_stats[(row_chunk0 + c) * 2 + 1];
      const long long kept_ties = min(max(allowed - ties_before, 0LL), ties_c);
      const long long kept = above_c + unit * kept_ties;
      if (c == chunk) {
        mine_start = start;
        mine_kept = kept;
        mine_ties_before = ties_before;
      }
      ties_before += ties_c;
      start += kept;
    }
    const long long draw = static_cast<long long>(floor(static_cast<double>(uniform[row]) *
                                                        static_cast<double>(start)));
    my_start = mine_start;
    my_ties_before = mine_ties_before;
    allowed_ties = allowed;
    target = draw;
    is_target = mine_start <= draw && draw < mine_start + mine_kept;
  }
  __syncthreads();
  if (!is_target) return;
  // Thread t walks tokens [first + t * per, + per) of the chunk in order; two block-wide prefix sums give it the
  // ties and the kept mass of the tokens before its own.
  const float* row_probs = probs + static_cast<long long>(row) * stride;
  const int first_token = chunk * chunk_size;
  const int last_token = min(first_token + chunk_size, vocab);
  const int per = (chunk_size + kThreads - 1) / kThreads;
  const int lo = min(first_token + tid * per, last_token);
  const int hi = min(lo + per, last_token);
  long long ties = 0;
  for (int t = lo; t < hi; ++t) ties += __float_as_int(row_probs[t]) == cut;
  long long unused;
  long long rank = my_ties_before + block_exclusive_scan(ties, warp_sums, &unused);
  long long kept_mass = 0;
  for (int t = lo; t < hi; ++t) {
    const float p = row_probs[t];
    const int bits = __float_as_int(p);
    const bool is_tie = bits == cut;
    rank += is_tie;  // 1-based among the row's ties
    if (bits > cut || (is_tie && rank <= allowed_ties)) kept_mass += mass_of(p);
  }
  long long running = my_start + block_exclusive_scan(kept_mass, warp_sums, &unused);
  if (!(running <= target && target < running + kept_mass)) return;
  rank -= ties;  // back to the ties before this thread's tokens
  for (int t = lo; t < hi; ++t) {
    const float p = row_probs[t];
    const int bits = __float_as_int(p);
    const bool is_tie = bits == cut;
    rank += is_tie;
    if (bits > cut || (is_tie && rank <= allowed_ties)) {
      running += mass_of(p);
      if (running > target) {
        out[row] = t;
        return;
      }
    }
  }
}

bool fits(int num_chunks, int chunk_size) {
  return num_chunks > 0 && num_chunks <= kMaxChunks && chunk_size > 0;
}

}  // namespace

extern "C" {

// Each returns a cudaError_t (0: launched). `device`: the CUDA device of the tensors; `stream`: a cudaStream_t.
int loraplex_top_p_histogram_pass(int device, void* stream, const float* probs, const float* top_p,
                                  const long long* stats_in, const int* prefix_in, const long long* above_in,
                                  long long* stats, int* prefix_out, long long* above_out, int num_rows,
                                  int vocab, long long stride, int num_chunks, int chunk_size, int shift,
                                  int first) {
  if (!fits(num_chunks, chunk_size) || shift < 0 || shift > 31 - kDigitBits) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  histogram_pass_kernel<<<dim3(num_rows, num_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      probs, top_p, stats_in, prefix_in, above_in, stats, prefix_out, above_out, vocab, stride, num_chunks,
      chunk_size, shift, first);
  return cudaGetLastError();
}

int loraplex_top_p_cut_stats(int device, void* stream, const float* top_p, const long long* stats_in,
                             const int* prefix_in, const long long* above_in, int* cut, long long* chunk_stats,
                             int num_rows, int num_chunks) {
  if (!fits(num_chunks, 1)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  cut_stats_kernel<<<dim3(num_rows, num_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      top_p, stats_in, prefix_in, above_in, cut, chunk_stats, num_chunks);
  return cudaGetLastError();
}

int loraplex_top_p_draw(int device, void* stream, const float* probs, const float* top_p, const float* uniform,
                        const int* cut, const long long* chunk_stats, long long* out, int num_rows, int vocab,
                        long long stride, int num_chunks, int chunk_size) {
  if (!fits(num_chunks, chunk_size)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  draw_kernel<<<dim3(num_rows, num_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      probs, top_p, uniform, cut, chunk_stats, out, vocab, stride, num_chunks, chunk_size);
  return cudaGetLastError();
}

}  // extern "C"
