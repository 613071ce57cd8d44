// The top-p radix passes and the draw of server/kernels/sampling/triton_top_p.py in CUDA: the same buffers, the same
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
// Built by server/kernels/sampling/cuda_top_p.py with nvcc into a plain shared library (no torch headers: a few seconds
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

__device__ __forceinline__ long long need_of(const float* top_p, int row) {
  // a row without top-p (NO_TOP_P, any value above 1, or no top_p at all) keeps every token (triton_top_p._need)
  if (top_p == nullptr || top_p[row] > 1.0f) return 1LL << 62;
  return static_cast<long long>(ceil(static_cast<double>(top_p[row]) * kMassScale));
}

// Exclusive prefix sum over the block's threads (every thread must call it).
__device__ long long block_exclusive_scan(long long value, long long* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const long long up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  long long before = 0;
  for (int w = 0; w < warp; ++w) before += warp_sums[w];
  __syncthreads();  // warp_sums may be reused by the caller's next scan
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
    const long long need = need_of(top_p, row);
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
    const long long need = need_of(top_p, row);
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
    if (chunk == 0 && start == 0) out[row] = vocab - 1;  // a row of zero kept mass: no program holds the target
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
  const long long ties_before = my_ties_before + block_exclusive_scan(ties, warp_sums);
  const long long allowed = allowed_ties;
  // Whether token t is kept; `rank` counts the ties seen so far (1-based among the row's ties).
  auto kept = [cut, allowed](float p, long long& rank) {
    const int bits = __float_as_int(p);
    rank += bits == cut;
    return bits > cut || (bits == cut && rank <= allowed);
  };
  long long rank = ties_before, kept_mass = 0;
  for (int t = lo; t < hi; ++t) {
    if (kept(row_probs[t], rank)) kept_mass += mass_of(row_probs[t]);
  }
  long long running = my_start + block_exclusive_scan(kept_mass, warp_sums);
  if (!(running <= target && target < running + kept_mass)) return;
  rank = ties_before;
  for (int t = lo; t < hi; ++t) {
    if (kept(row_probs[t], rank)) {
      running += mass_of(row_probs[t]);
      if (running > target) {
        out[row] = t;
        return;
      }
    }
  }
}

// No cut (no row has top-p): the cut -1 (every token kept) and each chunk's whole mass, no ties, as
// cut_stats_kernel would leave them, in one pass instead of the radix passes (triton_top_p._chunk_mass_kernel).
__global__ void __launch_bounds__(kThreads) chunk_mass_kernel(
    const float* __restrict__ probs, int* __restrict__ cut_out, long long* __restrict__ chunk_stats, int vocab,
    long long stride, int num_chunks, int chunk_size) {
  __shared__ long long warp_sums[kWarps];
  const int row = blockIdx.x, chunk = blockIdx.y, tid = threadIdx.x;
  const float* row_probs = probs + static_cast<long long>(row) * stride;
  const int end = min((chunk + 1) * chunk_size, vocab);
  long long mass = 0;
  for (int t = chunk * chunk_size + tid; t < end; t += kThreads) mass += mass_of(row_probs[t]);
  mass = warp_sum(mass);
  if ((tid & 31) == 0) warp_sums[tid >> 5] = mass;
  __syncthreads();
  if (tid != 0) return;
  long long total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  if (chunk == 0) cut_out[row] = -1;
  const long long out = (static_cast<long long>(row) * num_chunks + chunk) * 2;
  chunk_stats[out] = total;
  chunk_stats[out + 1] = 0;
}

// The buffers of one draw, carved from one int64 workspace of workspace_size(rows, chunks) elements. The radix
// passes ping-pong between two halves of stats, above and prefix: pass k writes half k % 2 and reads the other.
struct Workspace {
  long long* stats[2];  // [rows * chunks * kDigits]: each chunk's mass by digit
  long long* above[2];  // [rows * chunks]: each chunk's mass above the prefix
  int* prefix[2];       // [rows]
  int* cut;             // [rows]: the float pattern of the cut, -1 to keep every token
  long long* per_chunk; // [rows * chunks * 2]: each chunk's mass above the cut and its ties at it

  Workspace(long long* base, int rows, int chunks) {
    const long long cells = static_cast<long long>(rows) * chunks;
    for (int h = 0; h < 2; ++h) {
      stats[h] = base;
      base += cells * kDigits;
      above[h] = base;
      base += cells;
      prefix[h] = reinterpret_cast<int*>(base);
      base += rows;  // rows int32s in rows int64s
    }
    cut = reinterpret_cast<int*>(base);
    base += rows;
    per_chunk = base;
  }
};

constexpr int kPasses = (30 + kDigitBits - 1) / kDigitBits;  // triton_top_p.passes: bits 29..0

cudaError_t launch_cut(cudaStream_t stream, const float* probs, const float* top_p, const Workspace& w, int rows,
                       int vocab, long long stride, int chunks, int chunk_size) {
  const dim3 grid(rows, chunks);
  for (int k = 0; k < kPasses; ++k) {
    const int in = (k + 1) % 2, out = k % 2;
    histogram_pass_kernel<<<grid, kThreads, 0, stream>>>(
        probs, top_p, w.stats[in], w.prefix[in], w.above[in], w.stats[out], w.prefix[out], w.above[out], vocab,
        stride, chunks, chunk_size, kDigitBits * (kPasses - 1 - k), k == 0);
  }
  const int last = (kPasses - 1) % 2;
  cut_stats_kernel<<<grid, kThreads, 0, stream>>>(top_p, w.stats[last], w.prefix[last], w.above[last], w.cut,
                                                   w.per_chunk, chunks);
  return cudaGetLastError();
}

bool fits(int rows, int chunks, int chunk_size) {
  return rows > 0 && rows < 65536 && chunks > 0 && chunks <= kMaxChunks && chunk_size > 0;
}

}  // namespace

extern "C" {

// int64 elements of the workspace of a draw over `rows` rows of `chunks` chunks.
long long loraplex_top_p_workspace_size(int rows, int chunks) {
  return static_cast<long long>(rows) * (2LL * chunks * kDigits + 4LL * chunks + 3);
}

// Each launcher returns a cudaError_t (0: launched). `device`: the CUDA device of the tensors; `stream`: a
// cudaStream_t; probs [rows, vocab] float32 with rows `stride` apart; workspace as loraplex_top_p_workspace_size.

// The radix passes and the cut's statistics (Workspace::cut and ::per_chunk).
int loraplex_top_p_cut(int device, void* stream, const float* probs, const float* top_p, long long* workspace,
                       int rows, int vocab, long long stride, int chunks, int chunk_size) {
  if (!fits(rows, chunks, chunk_size)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  return launch_cut(static_cast<cudaStream_t>(stream), probs, top_p, Workspace(workspace, rows, chunks), rows,
                    vocab, stride, chunks, chunk_size);
}

// Token ids out [rows] int64: with top_p, the cut then the draw; with top_p null, every token kept (one pass of
// chunk masses, then the draw).
int loraplex_top_p_draw(int device, void* stream, const float* probs, const float* top_p, const float* uniform,
                        long long* workspace, long long* out, int rows, int vocab, long long stride, int chunks,
                        int chunk_size) {
  if (!fits(rows, chunks, chunk_size)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const Workspace w(workspace, rows, chunks);
  const dim3 grid(rows, chunks);
  if (top_p != nullptr) {
    err = launch_cut(s, probs, top_p, w, rows, vocab, stride, chunks, chunk_size);
    if (err != cudaSuccess) return err;
  } else {
    chunk_mass_kernel<<<grid, kThreads, 0, s>>>(probs, w.cut, w.per_chunk, vocab, stride, chunks, chunk_size);
  }
  draw_kernel<<<grid, kThreads, 0, s>>>(probs, top_p, uniform, w.cut, w.per_chunk, out, vocab, stride, chunks,
                                        chunk_size);
  return cudaGetLastError();
}

}  // extern "C"
