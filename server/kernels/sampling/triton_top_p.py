"""Steps 8-9 of the sampler in Triton, every row spread over many programs: top-p cut and inverse-CDF draw,
no sort.

Semantics are `sampling_masses`' exactly (integer masses floor(p * 2**40), ties by token id), so the tokens
equal the torch path's bit for bit (tests/unit/test_sampler.py under the interpreter, tests/gpu/test_sampler_gpu.py
on CUDA). The cut is the largest float bit pattern b with mass(p >= b) >= need (non-negative float32 values
order as their bit patterns; p <= 1 leaves bits 30 and 31 clear), found as a radix select: passes of
DIGIT_BITS bits each, from bit 29 down. Each pass is one launch over a grid of (row, chunk of CHUNK tokens):
a program first settles the previous pass's digit from every chunk's histogram of that pass (each program of
a row does the same small sum, so no launch of its own is needed), then writes its chunk's mass histogram over
the next digit of the tokens that share the prefix. Each chunk's mass of tokens above the prefix is carried from
pass to pass (the old one plus the chunk's digits over the chosen one, in a per-chunk buffer), so a pass computes
masses only in blocks that hold a token of the prefix; a block without one costs a load and a compare. Two more
launches follow: each chunk's mass above the cut and its ties at the cut, from the carried masses and the last
histograms alone; then the draw, done by the one program whose chunk holds the target. Every pass reads the
probabilities once (16 MB at 32 x 128k, from L2 after the first).

Where nvcc builds them, the radix passes and the draw run as CUDA kernels instead (server.kernels.sampling.cuda_top_p,
csrc/top_p.cu: the same buffers and integers; these Triton kernels stay their reference in the GPU tests and the
fallback): Triton has no scatter-add into shared memory, so `_histogram_kernel` accumulates a [SUB, 32] int64
one-hot per block, ~60 us a full pass at 32 x 128256 on the H200.

On the H200 at 32 x 128256 (tests/gpu/test_sampler_gpu.py's printout, 2026-12-02): 399 us against 1,241 for the
sorting torch steps, so it is the CUDA default. Before the carried masses (twelfth session) every pass, and the cut's
statistics, computed the mass of every token, and the best configuration took 620 us. The first version (one program
per row, a bit at a time: 34 passes on one SM per row) took 1,381 us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.sampling import cuda_top_p
from server.kernels.sampling.sampling_masses import MASS_BITS, NO_TOP_P

CHUNK = 4096  # tokens a program reads (128256 tokens: 32 chunks a row)
# H200, 32 x 128256 (tests/gpu/test_sampler_gpu.py, thirteenth session, with the carried masses), bits a pass and
# tokens at once: 5 and 128: 399 us; 4 and 128: 544; 4 and 64: 590; 5 and 64: 671; 3 and 128: 702; 6 and 128: 732;
# 6 and 64: 869. Before the carry, 4 and 128 was best (620) and 5 and 128 took 834: with it, the later passes skip
# most blocks, so fewer, wider passes pay.
SUB = 128  # tokens a program handles at once: a [SUB, 2**digit_bits] one-hot accumulated across the chunk
DIGIT_BITS = 5  # bits a pass settles: 6 passes for bits 29..0


def passes(digit_bits: int) -> int:
    """Radix passes for the 30 low bits of a probability's pattern (bits 30 and 31 are clear for p <= 1;
    a first digit that reaches past bit 29 just sees them as 0)."""
    return -(-30 // digit_bits)


@triton.jit
def _masses(p):
    return tl.floor(p.to(tl.float64) * 1099511627776.0).to(tl.int64)  # 2**40 = 2**MASS_BITS


@triton.jit
def _block(row_ptr, start, vocab, SUB: tl.constexpr):
    """SUB tokens of a row from `start`: their ids, whether each is in the vocabulary, p (0 past it), p's bits."""
    offs = start + tl.arange(0, SUB)
    valid = offs < vocab
    p = tl.load(row_ptr + offs, mask=valid, other=0.0)
    return offs, valid, p, p.to(tl.int32, bitcast=True)


@triton.jit
def _need(top_p_ptr, row):
    top_p = tl.load(top_p_ptr + row)
    need = tl.ceil(top_p.to(tl.float64) * 1099511627776.0).to(tl.int64)
    # top_p > 1 (NO_TOP_P) keeps every token, as the torch path does for rows without top-p (the floored masses
    # of a float32 softmax can sum past 2**40, so asking for that much mass would still cut the tail); a top_p
    # that is 1.0 only in float32 (0.99999999) cuts with need 2**40, as the torch path does
    return tl.where(top_p > 1.0, 1 << 62, need)


@triton.jit
def _settle(stats_ptr, prefix_ptr, above_ptr, row, chunk, num_chunks, need, shift,
            CHUNKS: tl.constexpr, DIGITS: tl.constexpr):
    """After the pass at `shift`: the new prefix, and for chunk `chunk` the mass of its tokens above that prefix
    and the mass of its tokens at the chosen digit. The new prefix is the pass's prefix (prefix_ptr) with the
    largest digit whose running mass from the top, plus the mass above the pass's prefix (the sum of every
    chunk's, above_ptr), reaches `need`; -1 (keep everything) when none does (the whole row is under need: then
    every token counts as above). A chunk's new mass above is its old one plus its digits over the chosen one, so
    no pass rereads the tokens above its prefix."""
    prefix = tl.load(prefix_ptr + row)
    chunks = tl.arange(0, CHUNKS)
    rev = tl.arange(0, DIGITS)  # rev j: digit DIGITS - 1 - j
    ok = chunks < num_chunks
    base = stats_ptr + (row * num_chunks + chunks) * DIGITS
    hist = tl.load(base[:, None] + (DIGITS - 1 - rev)[None, :], mask=ok[:, None], other=0)  # [CHUNKS, DIGITS]
    above_c = tl.load(above_ptr + row * num_chunks + chunks, mask=ok, other=0)
    running = tl.sum(above_c, axis=0) + tl.cumsum(tl.sum(hist, axis=0), 0)  # mass of digits >= DIGITS-1-j, + above
    first = tl.min(tl.where(running >= need, rev, DIGITS), axis=0)
    digit = DIGITS - 1 - first
    mine = chunks == chunk
    my_hist = tl.sum(tl.where(mine[:, None], hist, 0), axis=0)
    my_above = tl.sum(tl.where(mine, above_c, 0), axis=0) + tl.sum(tl.where(rev < first, my_hist, 0), axis=0)
    my_at_digit = tl.sum(tl.where(rev == first, my_hist, 0), axis=0)
    new_prefix = tl.where((prefix < 0) | (first == DIGITS), -1, prefix | (digit << shift))
    return new_prefix, my_above, my_at_digit


@triton.jit(do_not_specialize=["shift"])  # one variant for every pass but the first
def _histogram_kernel(probs_ptr, top_p_ptr, stats_in_ptr, prefix_in_ptr, above_in_ptr, stats_ptr, prefix_ptr,
                      above_ptr, vocab, stride, num_chunks, shift, FIRST: tl.constexpr, CHUNK: tl.constexpr,
                      SUB: tl.constexpr, CHUNKS: tl.constexpr, DIGITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if FIRST:
        prefix = tl.zeros((), dtype=tl.int32)
        above = tl.zeros((), dtype=tl.int64)
    else:
        prefix, above, _ = _settle(stats_in_ptr, prefix_in_ptr, above_in_ptr, row, chunk, num_chunks,
                                   _need(top_p_ptr, row), shift + DIGIT_BITS, CHUNKS, DIGITS)
        prefix = prefix.to(tl.int32)
    if chunk == 0:
        tl.store(prefix_ptr + row, prefix)
    tl.store(above_ptr + row * num_chunks + chunk, above)
    digits = tl.arange(0, DIGITS)
    hist = tl.zeros((SUB, DIGITS), dtype=tl.int64)  # reduced once, after the loop
    row_ptr = probs_ptr + row.to(tl.int64) * stride
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, SUB):
        offs, valid, p, bits = _block(row_ptr, start, vocab, SUB)
        if FIRST:  # the prefix is empty: every token is in (no shift by 32 for a digit at bit 31)
            is_in = valid
            any_in = True
        else:  # a prefix of -1 matches no token
            is_in = valid & ((bits >> (shift + DIGIT_BITS)) == (prefix >> (shift + DIGIT_BITS)))
            # Past the first passes few tokens share the prefix: a block without one costs a load and a compare.
            any_in = tl.max(is_in.to(tl.int32), axis=0) > 0
        if any_in:
            digit = (bits >> shift) & (DIGITS - 1)
            mass = tl.where(is_in, _masses(p), 0)
            hist += tl.where(digit[:, None] == digits[None, :], mass[:, None], 0)
    tl.store(stats_ptr + (row * num_chunks + chunk) * DIGITS + digits, tl.sum(hist, axis=0))


@triton.jit
def _cut_stats_kernel(top_p_ptr, stats_in_ptr, prefix_in_ptr, above_in_ptr, cut_ptr, chunk_ptr, num_chunks,
                      CHUNKS: tl.constexpr, DIGITS: tl.constexpr):
    """The cut (settled from the last pass), then per chunk, from the carried masses and without reading the
    probabilities: the mass above the cut, and the ties at it (tokens whose pattern is the cut: all of one mass,
    so their count is the chunk's mass at the last digit over that one mass; a zero mass never needs a count)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cut, above, at_cut = _settle(stats_in_ptr, prefix_in_ptr, above_in_ptr, row, chunk, num_chunks,
                                 _need(top_p_ptr, row), 0, CHUNKS, DIGITS)
    cut = cut.to(tl.int32)
    if chunk == 0:
        tl.store(cut_ptr + row, cut)
    unit = _masses(tl.maximum(cut, 0).to(tl.float32, bitcast=True))  # every tie has this mass
    ties = tl.where((cut >= 0) & (unit > 0), at_cut // tl.maximum(unit, 1), 0)
    out = chunk_ptr + (row * num_chunks + chunk) * 2
    tl.store(out, above)
    tl.store(out + 1, ties)


@triton.jit
def _draw_kernel(probs_ptr, top_p_ptr, uniform_ptr, cut_ptr, chunk_ptr, out_ptr, vocab, stride, num_chunks,
                 CHUNK: tl.constexpr, SUB: tl.constexpr, CHUNKS: tl.constexpr):
    """Kept: every p above the cut and, of the ties at it, the lowest ids, as many as the mass still needed
    takes. The draw: the first kept token whose running mass exceeds floor(u * kept mass), found by the
    program whose chunk holds that mass."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cut = tl.load(cut_ptr + row)
    chunks = tl.arange(0, CHUNKS)
    ok = chunks < num_chunks
    base = chunk_ptr + (row * num_chunks + chunks) * 2
    above_c = tl.load(base, mask=ok, other=0)
    ties_c = tl.load(base + 1, mask=ok, other=0)
    above = tl.sum(above_c, axis=0)
    unit = _masses(tl.maximum(cut, 0).to(tl.float32, bitcast=True))  # every tie has this mass
    need = _need(top_p_ptr, row)
    allowed = tl.where(unit > 0, (need - above + unit - 1) // tl.maximum(unit, 1), 1 << 40)
    ties_before_c = tl.cumsum(ties_c, 0) - ties_c
    kept_ties_c = tl.minimum(tl.maximum(allowed - ties_before_c, 0), ties_c)
    kept_c = above_c + unit * kept_ties_c
    start_c = tl.cumsum(kept_c, 0) - kept_c
    total = tl.sum(kept_c, axis=0)
    target = tl.floor(tl.load(uniform_ptr + row).to(tl.float64) * total.to(tl.float64)).to(tl.int64)
    mine = chunks == chunk
    my_start = tl.sum(tl.where(mine, start_c, 0), axis=0)
    my_kept = tl.sum(tl.where(mine, kept_c, 0), axis=0)
    if (my_start <= target) & (target < my_start + my_kept):
        seen_ties = tl.sum(tl.where(mine, ties_before_c, 0), axis=0)
        running = my_start
        chosen = tl.zeros((), dtype=tl.int64) + vocab - 1
        row_ptr = probs_ptr + row.to(tl.int64) * stride
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, SUB):
            offs, valid, p, bits = _block(row_ptr, start, vocab, SUB)
            is_tie = valid & (bits == cut)
            rank = seen_ties + tl.cumsum(is_tie.to(tl.int64), 0)  # 1-based among the row's ties
            keep = valid & ((bits > cut) | (is_tie & (rank <= allowed)))
            cdf = running + tl.cumsum(tl.where(keep, _masses(p), 0), 0)
            chosen = tl.minimum(chosen, tl.min(tl.where(cdf > target, offs, vocab), axis=0).to(tl.int64))
            running = tl.max(cdf, axis=0)
            seen_ties += tl.sum(is_tie.to(tl.int64), axis=0)
        tl.store(out_ptr + row, chosen)


@triton.jit
def _chunk_mass_kernel(probs_ptr, cut_ptr, chunk_ptr, vocab, stride, num_chunks, CHUNK: tl.constexpr,
                       SUB: tl.constexpr):
    """No cut (no row has top-p): the cut -1 (every token kept) and each chunk's whole mass, no ties, as
    _cut_stats_kernel would leave them, in one pass instead of the radix passes."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if chunk == 0:
        tl.store(cut_ptr + row, tl.full((), -1, tl.int32))
    mass = tl.zeros((SUB,), dtype=tl.int64)
    row_ptr = probs_ptr + row.to(tl.int64) * stride
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, SUB):
        offs, valid, p, bits = _block(row_ptr, start, vocab, SUB)
        mass += _masses(p)  # p is 0 past the vocabulary
    out = chunk_ptr + (row * num_chunks + chunk) * 2
    tl.store(out, tl.sum(mass, axis=0))
    tl.store(out + 1, tl.zeros((), dtype=tl.int64))


def _aligned(n: int, per_16_bytes: int) -> int:
    """n rounded up to whole 16-byte units of `per_16_bytes` elements."""
    return -(-n // per_16_bytes) * per_16_bytes


def _use_cuda(probs: torch.Tensor, digit_bits: int, num_chunks: int, cuda: bool | None) -> bool:
    """The CUDA kernels (server.kernels.sampling.cuda_top_p) where they serve this call: `cuda` None picks them when
    they build; True insists (a test comparing the two)."""
    fits = digit_bits == cuda_top_p.DIGIT_BITS and num_chunks <= cuda_top_p.MAX_CHUNKS and probs.stride(1) == 1
    if cuda is None:
        return fits and cuda_top_p.available(probs.device)
    if cuda and not fits:
        raise ValueError("the CUDA top-p kernels take 5-bit digits, <= 256 chunks a row and contiguous rows")
    return cuda


def top_p_cut(probs: torch.Tensor, top_p: torch.Tensor, chunk: int = CHUNK, digit_bits: int = DIGIT_BITS,
              sub: int = SUB, cuda: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The radix passes and the cut's statistics: (cut [R] int32: the float pattern of the cut, -1 to keep every
    token; per_chunk [R * chunks * 2] int64: each chunk's mass above the cut and its ties at it). `cuda`: in CUDA
    (server.kernels.sampling.cuda_top_p; None: where it builds and digit_bits is 5)."""
    num_rows, vocab = probs.shape
    num_chunks = triton.cdiv(vocab, chunk)
    if _use_cuda(probs, digit_bits, num_chunks, cuda):
        return cuda_top_p.cut(probs, top_p, chunk)
    chunks_p2 = triton.next_power_of_2(num_chunks)
    digits = 1 << digit_bits
    # Each pass reads one half of these pairs and writes the other: both halves start 16-byte aligned whatever
    # the batch, or the second half's alignment (prefix: num_rows int32s in) made Triton build new variants of
    # the histogram and cut kernels mid-serving (H200 c32 run of the tenth session: one 1.05 s step).
    stats = torch.empty(2, _aligned(num_rows * num_chunks * digits, 2), dtype=torch.int64, device=probs.device)
    prefix = torch.empty(2, _aligned(num_rows, 4), dtype=torch.int32, device=probs.device)
    above = torch.empty(2, _aligned(num_rows * num_chunks, 2), dtype=torch.int64, device=probs.device)  # per chunk
    grid = (num_rows, num_chunks)
    num_passes = passes(digit_bits)
    for k in range(num_passes):  # pass k writes stats, prefix and above [k % 2] and reads the other half of each
        shift = digit_bits * (num_passes - 1 - k)
        i, o = (k + 1) % 2, k % 2
        _histogram_kernel[grid](probs, top_p, stats[i], prefix[i], above[i], stats[o], prefix[o], above[o],
                                vocab, probs.stride(0), num_chunks, shift, FIRST=k == 0, CHUNK=chunk, SUB=sub,
                                CHUNKS=chunks_p2, DIGITS=digits, DIGIT_BITS=digit_bits, num_warps=4)
    last = (num_passes - 1) % 2
    cut = torch.empty(num_rows, dtype=torch.int32, device=probs.device)
    per_chunk = torch.empty(num_rows * num_chunks * 2, dtype=torch.int64, device=probs.device)
    _cut_stats_kernel[grid](top_p, stats[last], prefix[last], above[last], cut, per_chunk, num_chunks,
                            CHUNKS=chunks_p2, DIGITS=digits, num_warps=4)
    return cut, per_chunk


def _draw(probs, top_p, uniform, cut, per_chunk, out, chunk: int, sub: int) -> torch.Tensor:
    num_rows, vocab = probs.shape
    num_chunks = triton.cdiv(vocab, chunk)
    _draw_kernel[(num_rows, num_chunks)](probs, top_p, uniform, cut, per_chunk, out, vocab, probs.stride(0),
                                         num_chunks, CHUNK=chunk, SUB=sub, CHUNKS=triton.next_power_of_2(num_chunks),
                                         num_warps=4)
    return out


def top_p_draw(probs: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor, chunk: int = CHUNK,
               digit_bits: int = DIGIT_BITS, sub: int = SUB, cuda: bool | None = None) -> torch.Tensor:
    """Token ids [R] int64 from probabilities [R, vocab] float32 (contiguous rows), top_p [R] and
    uniform [R] float32: `draw_from_masses(integer_masses(probs) masked by top_p_keep, uniform)`, and
    for rows with top_p NO_TOP_P (any value above 1) no mask at all. `chunk`: tokens a program reads (a
    multiple of `sub`); `digit_bits`: bits a radix pass settles; `cuda`: the passes and the draw in CUDA
    (server.kernels.sampling.cuda_top_p; None: where they build and digit_bits is 5)."""
    assert MASS_BITS == 40, "the kernels' mass scale is 2**40"
    assert chunk % sub == 0
    num_rows, vocab = probs.shape
    if num_rows and _use_cuda(probs, digit_bits, triton.cdiv(vocab, chunk), cuda):
        return cuda_top_p.draw(probs, top_p, uniform, chunk)
    out = torch.full((num_rows,), vocab - 1, dtype=torch.int64, device=probs.device)  # a row of zero mass
    if not num_rows:
        return out
    # Fresh copies: the sampler passes rows of one [5, R] parameter tensor, whose 16-byte alignment (which
    # Triton specializes pointers on) changes with R; an even batch then built new kernel variants in the
    # middle of serving (H200 c32 run of 2026-12-02: steps of 0.67 and 1.46 s).
    top_p = top_p.to(torch.float32, copy=True)
    uniform = uniform.to(torch.float32, copy=True)
    cut, per_chunk = top_p_cut(probs, top_p, chunk, digit_bits, sub, cuda=False)
    return _draw(probs, top_p, uniform, cut, per_chunk, out, chunk, sub)


def full_draw(probs: torch.Tensor, uniform: torch.Tensor, chunk: int = CHUNK, sub: int = SUB,
              cuda: bool | None = None) -> torch.Tensor:
    """`draw_from_masses(integer_masses(probs), uniform)` for rows without top-p: `top_p_draw` with every token
    kept, one pass for the chunks' masses instead of the radix passes. The torch steps' cumulative sum of int64
    masses took 242 of a temperature-only draw's 368 us at 32 x 128256 (H200, bench.sampler_profile)."""
    assert chunk % sub == 0
    num_rows, vocab = probs.shape
    if num_rows and _use_cuda(probs, DIGIT_BITS, triton.cdiv(vocab, chunk), cuda):
        return cuda_top_p.draw(probs, None, uniform, chunk)
    out = torch.full((num_rows,), vocab - 1, dtype=torch.int64, device=probs.device)  # a row of zero mass
    if not num_rows:
        return out
    uniform = uniform.to(torch.float32, copy=True)  # a fresh, aligned copy (see top_p_draw)
    keep_all = torch.full((num_rows,), NO_TOP_P, dtype=torch.float32, device=probs.device)
    num_chunks = triton.cdiv(vocab, chunk)
    cut = torch.empty(num_rows, dtype=torch.int32, device=probs.device)
    per_chunk = torch.empty(num_rows * num_chunks * 2, dtype=torch.int64, device=probs.device)
    grid = (num_rows, num_chunks)
    _chunk_mass_kernel[grid](probs, cut, per_chunk, vocab, probs.stride(0), num_chunks, CHUNK=chunk, SUB=sub,
                             num_warps=4)
    return _draw(probs, keep_all, uniform, cut, per_chunk, out, chunk, sub)
