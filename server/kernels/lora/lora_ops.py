"""Batched multi-adapter LoRA: a plain-loop reference, a pure-torch path, and the dispatcher.

Every token of a batch may use a different adapter slot. Tokens come in segments (one per request);
the Triton kernels in `triton_lora.py` walk segments so that a slot's A/B tiles are reused across the
tokens of a prefill segment, while the torch path works per token.
"""

from __future__ import annotations

import functools
import itertools
import os
from types import SimpleNamespace

import torch

from server.kernels.backends import triton_available  # a name of this module: tests patch it here
from server.kernels.lora.lora_meta import (  # noqa: F401  (re-exported: the ops' public surface)
    LoraBatchMeta,
    SlotLayout,
    check_lora_shapes,
    decode_lora_meta,
    make_lora_meta,
)
from server.kernels.lora.pending_lora import PendingLora
from server.kernels.split_sums import SplitSums

# LORAPLEX_LORA_KERNEL=torch forces the pure-torch path on CUDA too (debugging, A/B timing).
USE_TRITON_LORA = os.environ.get("LORAPLEX_LORA_KERNEL", "triton") == "triton"
# LORAPLEX_LORA_SIDE_STREAM=0 runs the shrink after the base matmul on one stream (A/B timing).
SIDE_STREAM = os.environ.get("LORAPLEX_LORA_SIDE_STREAM", "1") == "1"
# In the decode graphs, a LoRA linear whose base splits K has the expand sum the base's partials itself
# (triton_lora_decode.lora_expand_sums: one launch instead of csrc's sum kernel then the expand, bit for bit the same).
# H200, fourteenth session, one machine each: the 1B c32 engine's decode step (32 adapters) 1.849 -> 1.785 ms; 8B
# batch 32 unmerged one adapter 6.43 -> 6.36, mixed8 6.46 -> 6.41, mixed32 6.60 -> 6.70 (within the runs' spread). Its
# first form, one-token programs, made the 8B mixed32 step 7.53 ms. LORAPLEX_LORA_FUSED_SUMS=0: the two launches.
FUSED_SUMS = os.environ.get("LORAPLEX_LORA_FUSED_SUMS", "1") == "1"
# LORAPLEX_LORA_SIDE_EXPAND=1: in the decode graphs the expand of a linear of several slices (qkv, gate_up) runs on
# the side stream too, after the shrink, into an fp32 delta [T, out] (triton_lora_decode.lora_delta), and the join
# after the base matmul only adds it (lora_add_delta, summing the base's partials as lora_expand_sums does): bit for
# bit the same output. The expand then no longer follows the base matmul on the step's critical path; it reads B (the
# adapters' bulk: 29 MB of 8B gate_up's for 32 adapters, 6 MB of qkv's) beside it, and the join reads 4 bytes a
# token and column. One-slice linears (o, down: 4 MB of B each) keep lora_expand_sums, whose dot starts from the base
# output (lora_delta's docstring says why that rounds differently). =2: and where the caller takes split-K partials
# (qkv_proj and gate_up_proj, from llama.DEFER_MIN_ROWS rows), the delta rides with them (SplitSums.delta) to the
# rotary or activation kernel that sums them, which adds it (no join launch: the step's launches on the critical path
# are then those of the merged step). Measured (H200, 8B mixed32 decode step, bench.profile_step's unprofiled wall,
# one machine, twenty-ninth session): 5.900 ms off, 5.871 at =1, 5.850 at =2 (within a run's spread): the side
# stream's delta kernel took 1.75 ms a step beside the NF4 kernels where the expand took ~0.8 on the main stream, so
# the work moved beside the base instead of leaving the step. Off by default: the bits are the same either way.
_SIDE_EXPAND_SETTING = os.environ.get("LORAPLEX_LORA_SIDE_EXPAND", "0")
if _SIDE_EXPAND_SETTING not in ("", "0", "1", "2"):
    raise ValueError(f"LORAPLEX_LORA_SIDE_EXPAND must be 0, 1 or 2, got {_SIDE_EXPAND_SETTING!r}")
SIDE_EXPAND = int(_SIDE_EXPAND_SETTING or 0)

# LORAPLEX_LORA_FUSED_ACT (default 1; with LORAPLEX_LORA_ONE_ROW): in the decode graphs gate_up's expand is left to
# the activation kernel that reads gate_up's output (pending_lora.PendingLora; triton_glue.silu_mul adds the delta as
# the one-row expand computes it, bit for bit): one launch and one write and read of [T, 2I] fewer a layer. Measured
# (H100, thirty-first session, 8B mixed32 decode step, bench.profile_step's wall, one machine): 5.714 -> 5.667 ms.
FUSED_ACT = os.environ.get("LORAPLEX_LORA_FUSED_ACT", "1") == "1"

# Cap on the elements of the per-token gathered A or B held at once by the torch path.
_GATHER_BUDGET = 1 << 24


def lora_apply_reference(y, x, lora_a, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
                         slice_offsets: tuple[int, ...]) -> None:
    """Add each token's LoRA delta into y, one token at a time (the oracle for the fast paths).

    Shapes (the pool layout is `SlotLayout`'s):
      y: [T, out] updated in place; x: [T, in]
      lora_a: [num_slices * capacity, in]   (scaling NOT here)
      lora_b: [capacity, out]               (B transposed, scaling folded in)
      slice_offsets: python ints, len num_slices + 1, [0, ..., out]

    Semantics, with n = num_slices and (o, r) = the token's slot offset and rank read from the device:
      for t in range(T):
          s = token_slots[t]
          if s < 0: continue
          h = lora_a[n*o : n*(o+r)] @ x[t]              # [n * r], fp32 accumulate
          for i in range(n):
              lo, hi = slice_offsets[i], slice_offsets[i+1]
              y[t, lo:hi] += lora_b[o:o+r, lo:hi].T @ h[i*r:(i+1)*r]
    """
    n = check_lora_shapes(y, x, lora_a, lora_b, layout, meta, slice_offsets)
    offsets, ranks = layout.offsets.tolist(), layout.ranks.tolist()
    for t, s in enumerate(meta.token_slots.tolist()):
        if s < 0:
            continue
        o, r = offsets[s], ranks[s]
        h = lora_a[n * o : n * (o + r)].float() @ x[t].float()
        for i, (lo, hi) in enumerate(itertools.pairwise(slice_offsets)):
            y[t, lo:hi] += lora_b[o : o + r, lo:hi].float().t() @ h[i * r : (i + 1) * r]


def lora_apply_torch(y, x, lora_a, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
                     slice_offsets: tuple[int, ...]) -> None:
    """Same semantics as `lora_apply_reference`, vectorised per token; graph-capturable (no host syncs,
    static shapes). Gathers each token's A and B rows padded to max_rank (masked), in chunks of tokens
    to bound the temporary memory."""
    n = check_lora_shapes(y, x, lora_a, lora_b, layout, meta, slice_offsets)
    num_tokens = x.shape[0]
    if num_tokens == 0 or lora_b.shape[0] == 0 or layout.num_slots == 0:
        return
    max_rank = layout.max_rank
    per_token = max_rank * (n * lora_a.shape[1] + lora_b.shape[1])
    chunk = max(1, _GATHER_BUDGET // per_token)
    k = torch.arange(max_rank, device=x.device)
    for t0 in range(0, num_tokens, chunk):
        t1 = min(t0 + chunk, num_tokens)
        slots = meta.token_slots[t0:t1]
        idx = slots.clamp(min=0).long()
        offsets, ranks = layout.offsets[idx].long(), layout.ranks[idx].long()  # [t]
        is_active = (slots >= 0).unsqueeze(-1)  # [t, 1]
        valid = (k < ranks.unsqueeze(-1)) & is_active  # [t, R]
        a_rows = (n * offsets)[:, None, None] + torch.arange(n, device=x.device)[None, :, None] \
            * ranks[:, None, None] + k  # [t, n, R]
        a_rows = torch.where(valid.unsqueeze(1), a_rows, 0).flatten(1)
        h = torch.bmm(lora_a[a_rows].float(), x[t0:t1].float().unsqueeze(-1)).view(-1, n, max_rank)
        # where, not a multiply: rows gathered for padding may belong to another slot or hold garbage.
        h = torch.where(valid.unsqueeze(1), h, 0.0)
        b = torch.where(valid.unsqueeze(-1), lora_b[torch.where(valid, offsets[:, None] + k, 0)].float(), 0.0)
        for i, (lo, hi) in enumerate(itertools.pairwise(slice_offsets)):
            if lo == hi:
                continue
            delta = torch.bmm(h[:, i].unsqueeze(1), b[:, :, lo:hi]).squeeze(1)  # [t, hi - lo]
            y[t0:t1, lo:hi] += delta


def lora_apply(y, x, lora_a, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
               slice_offsets: tuple[int, ...]) -> None:
    """Add the per-token LoRA delta into y (semantics of `lora_apply_reference`): Triton on CUDA,
    torch elsewhere."""
    if y.is_cuda and USE_TRITON_LORA and triton_available():
        from server.kernels.lora.triton_lora import lora_apply_triton

        lora_apply_triton(y, x, lora_a, lora_b, layout, meta, slice_offsets)
    else:
        lora_apply_torch(y, x, lora_a, lora_b, layout, meta, slice_offsets)


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream that a device's decode graphs run LoRA shrinks on, beside the base matmuls, at the default priority
    (LORAPLEX_LORA_SIDE_PRIORITY, a higher one, measured slower on the H200 in the forty-sixth session, was removed;
    design in 4f37464). The shrinks on the capturing stream itself, ahead of the base with no fork or join
    (LORAPLEX_LORA_ONE_STREAM, design in e0ffd91), measured slower on the H200 in the forty-eighth session: 8B
    mixed32 step 4.685 -> 5.208 ms alone, 4.67 -> 5.31 with LORAPLEX_PDL_LORA and LORAPLEX_LORA_ONE_FILL, so the
    side-stream shrink still overlaps the base; removed. Building the x-resident base to fewer registers so that the
    shrink's programs fit beside its blocks (LORAPLEX_LORA_BASE_ROOM, designs in f3ee169 and 3f33b24) measured slower
    on an H100 in the fifty-fourth session: gate_up's base 36.9 -> 41.0 us a layer and its shrink no sooner done, the
    mixed32 step 5.167 -> 5.353 ms; removed."""
    return torch.cuda.Stream(device=device)


def forks_beside(device: torch.device) -> bool:
    """Whether a LoRA linear on `device` forks its shrink onto the side stream now: a CUDA graph being captured (the
    decode steps) with the Triton kernels (linear_with_lora; act_shrink takes the same condition)."""
    return (SIDE_STREAM and device.type == "cuda" and torch.cuda.is_current_stream_capturing() and USE_TRITON_LORA
            and triton_available())


def on_side_stream(device: torch.device, work) -> None:
    """Run work() on the side stream, after everything queued on the current one (the next LoRA linear's shrink
    queues behind it, and its join orders the current stream after both)."""
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()


def base_output(base, x: torch.Tensor, defer_sum: bool) -> torch.Tensor | SplitSums:
    """base(x); with `defer_sum`, maybe its unsummed split-K partials (a base that takes the flag is only asked
    when it is set: tests pass plain torch.nn.Linear bases)."""
    return base(x, defer_sum=True) if defer_sum else base(x)


def linear_with_lora(base, x, lora_a, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
                     slice_offsets: tuple[int, ...], defer_sum: bool = False, defer_delta: bool = False,
                     h: torch.Tensor | None = None) -> torch.Tensor | SplitSums | PendingLora:
    """base(x) plus the per-token LoRA delta. While a CUDA graph is captured (the decode steps), with the Triton
    kernels, the shrink (which reads only x) runs on a side stream beside the base matmul, and the expand adds
    into base(x) once both are done: the shrink's short, DRAM-bound launches fill SMs that the L1-bound NF4
    kernel leaves idle at its waves' tails. The graph holds it as a fork and a join. The side stream waits for
    the current one before each shrink, so everything it uses (x, and blocks the allocator hands it) is ordered
    after earlier work. There, with one token a segment (every decode graph), the base may also hand back its
    split-K partials unsummed (split_sums.SplitSums): the expand then sums them, rounds the base's output and adds
    the delta in one launch (`triton_lora_decode.lora_expand_sums`), where csrc's sum kernel and the expand took
    two. With SIDE_EXPAND the expand of qkv and gate_up follows the shrink on the side stream, into an fp32 delta,
    and the join only adds it; with SIDE_EXPAND 2 and `defer_sum` (the caller's kernel sums partials), there is no
    join: the partials come back with the delta (SplitSums.delta) for that kernel to add. With FUSED_ACT and
    `defer_delta` (the caller's kernel adds a pending delta: the activation after gate_up), the expand is not run
    here: the base output (or its partials) comes back with what the expand reads (PendingLora). `h`: the shrink's
    output, already computed by the kernel before (act_shrink: down_proj's, by the activation); then there is no
    shrink and no fork, only the base and the expand.

    Eager steps (prefills) run on one stream: there the host is the bound, not the GPU. The H200 8B prefill of
    32 x 128 tokens through 32 adapters took 57-98 ms of host time against 33.5 ms of kernels (merged: 26 ms
    against 22.8), and of the 67 ms that cProfile charged the LoRA linears over the merged step, 18 or more
    went to the fork and join's stream switches and events (bench/NOTES.md, twelfth session).

    Deferring the sums of a LoRA linear to the glue kernel that reads its output (the expand adding its delta in
    fp32 into the first split's partials) was measured and dropped (H200, 8B, fourteenth session): mixed32 step
    6.61 -> 6.91 ms; the expand into fp32 and the glue kernels' 16-plane reads at 32 rows cost more than the sum
    kernel they saved."""
    if not forks_beside(x.device):
        y = base(x)
        lora_apply(y, x, lora_a, lora_b, layout, meta, slice_offsets)
        return y
    from server.kernels.lora.triton_lora import lora_shrink, one_row_launch
    from server.kernels.lora.triton_lora_decode import lora_add_delta, lora_delta

    y_like = SimpleNamespace(shape=(x.shape[0], slice_offsets[-1]))  # base(x)'s shape, checked before it runs
    num_slices = check_lora_shapes(y_like, x, lora_a, lora_b, layout, meta, slice_offsets)
    if lora_b.shape[0] == 0 or layout.num_slots == 0:
        return base(x)
    one_token_segments = meta.one_token_segments(x.shape[0])
    fused = FUSED_SUMS and one_token_segments and getattr(base, "may_defer_sum", False)
    if h is not None:
        if not one_token_segments or h.shape != (x.shape[0], num_slices * layout.max_rank):
            raise ValueError("a precomputed h takes one-token segments and the shape the shrink gives")
        return _expanded(base(x, defer_sum=True) if fused else base(x), h, lora_b, layout, meta, slice_offsets)
    current, side = torch.cuda.current_stream(x.device), side_stream(x.device)
    side.wait_stream(current)
    side_expand = SIDE_EXPAND and one_token_segments and num_slices > 1
    with torch.cuda.stream(side):
        h = lora_shrink(x, lora_a, layout, meta, num_slices)
        delta = lora_delta(h, lora_b, layout, meta, slice_offsets) if side_expand else None
    pending = (FUSED_ACT and defer_delta and delta is None and one_token_segments
               and one_row_launch(lora_b, layout) is not None)
    y = base(x, defer_sum=True) if fused else base(x)
    current.wait_stream(side)
    if tuple(y.shape) != y_like.shape:
        raise ValueError(f"the base layer gave {tuple(y.shape)}, the adapters' slices need {y_like.shape}")
    if pending:
        return PendingLora(y, h, lora_b, layout, meta, slice_offsets)
    if delta is not None:
        if SIDE_EXPAND >= 2 and defer_sum and isinstance(y, SplitSums):
            return SplitSums(y.partials, y.bias, y.dtype, delta)
        return lora_add_delta(y if isinstance(y, SplitSums) else y.contiguous(), delta, meta)
    return _expanded(y, h, lora_b, layout, meta, slice_offsets)


def _expanded(y: torch.Tensor | SplitSums, h, lora_b, layout: SlotLayout, meta: LoraBatchMeta,
              slice_offsets: tuple[int, ...]) -> torch.Tensor:
    """The base output y (or its split-K partials, summed here) plus the expand of h."""
    from server.kernels.lora.triton_lora import lora_expand
    from server.kernels.lora.triton_lora_decode import lora_expand_sums

    if isinstance(y, SplitSums):
        return lora_expand_sums(y, h, lora_b, layout, meta, slice_offsets)
    lora_expand(y, h, lora_b, layout, meta, slice_offsets)
    return y
