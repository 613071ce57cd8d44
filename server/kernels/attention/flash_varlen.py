"""Fresh prompts of different lengths in one flash-attention call (FlashAttention-2's varlen forward in PyTorch).

A fresh prompt (no cached prefix) attends only to its own new keys, which the step holds in k and v: the
sequences are packed back to back and described by cumulative lengths, so one call covers any mix of lengths
without padding or a loop over sequences. Used by attention_ops.prefill_attention for the fresh prompts that no
equal-length SDPA group takes; prompts with a cached prefix read the paged cache (triton_prefill_attention).

Why this and not the Triton kernel for them: 32 prompts of 256-3,840 tokens on the 8B shape prefilled 13% slower
than 32 of 2,048 (H200, bench.prefill), where the extra causal attention work is about 1% of the step's FLOPs;
the equal set ran flash kernels through SDPA, the unequal one the Triton kernel (one masked tile loop, no
diagonal split, no software pipelining). FlashInfer was not taken: not in the GPU image's packages, and its
paged prefill adds nothing here, since these keys are not read from the cache.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from server.kernels.host_device import to_device


def available(q: torch.Tensor) -> bool:
    """FlashAttention-2 runs 16-bit inputs on sm80+ NVIDIA GPUs, head dims up to 256, in torch builds that have it."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and torch.version.hip is None
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


class Packing(NamedTuple):
    """Where a call's sequences sit in the step's rows: one span [first, end) when they are back to back in
    q_start order, else `rows` (their row indices, in order); cumulative lengths and the longest."""

    first: int
    end: int
    rows: list[int] | None
    cu_lens: list[int]
    max_len: int


def packing(seqs: list) -> Packing:
    """How `seqs` (PrefillSeq, fresh) are packed for one varlen call, from host facts alone."""
    seqs = sorted(seqs, key=lambda s: s.q_start)
    cu_lens = [0, *itertools.accumulate(s.q_len for s in seqs)]
    back_to_back = all(a.q_start + a.q_len == b.q_start for a, b in itertools.pairwise(seqs))
    rows = None if back_to_back else [r for s in seqs for r in range(s.q_start, s.q_start + s.q_len)]
    return Packing(seqs[0].q_start, seqs[-1].q_start + seqs[-1].q_len, rows, cu_lens, max(s.q_len for s in seqs))


def fresh_attention(q, k, v, seqs: list, scale: float, out: torch.Tensor, memo: dict | None = None) -> None:
    """Causal attention of fresh prompts (q [T, Hq, D], k and v [T, Hkv, D], the step's rows) into their rows of
    `out`. `memo`: the step's dict shared by its layers (the packing's device tensors are built once a step)."""
    key = ("flash_varlen", tuple((s.q_start, s.q_len) for s in seqs))
    cached = None if memo is None else memo.get(key)
    if cached is None:
        pack = packing(seqs)
        cu_lens = to_device(pack.cu_lens, torch.int32, q.device)
        rows = None if pack.rows is None else to_device(pack.rows, torch.long, q.device)
        cached = (pack, cu_lens, rows)
        if memo is not None:
            memo[key] = cached
    pack, cu_lens, rows = cached
    if rows is None:
        qs, ks, vs = q[pack.first : pack.end], k[pack.first : pack.end], v[pack.first : pack.end]
    else:
        qs, ks, vs = q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows)
    attended = torch.ops.aten._flash_attention_forward(
        qs, ks, vs, cu_lens, cu_lens, pack.max_len, pack.max_len, 0.0, True, False, scale=scale
    )[0]
    if rows is None:
        out[pack.first : pack.end] = attended
    else:
        out.index_copy_(0, rows, attended)
