"""Batched multi-adapter LoRA: a plain-loop reference, a pure-torch path, and the dispatcher.

Every token of a batch may use a different adapter slot. Tokens come in segments (one per request);
the Triton kernels in `triton_lora.py` walk segments so that a slot's A/B tiles are reused across the
tokens of a prefill segment, while the torch path works per token.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch

from server.model.lora_meta import (  # noqa: F401  (re-exported: the ops' public surface)
    LoraBatchMeta,
    check_lora_shapes,
    decode_lora_meta,
    make_lora_meta,
)

# LORAPLEX_LORA_KERNEL=torch forces the pure-torch path on CUDA too (debugging, A/B timing).
USE_TRITON_LORA = os.environ.get("LORAPLEX_LORA_KERNEL", "triton") == "triton"

# Cap on the elements of the per-token gathered A or B held at once by the torch path.
_GATHER_BUDGET = 1 << 24


def lora_apply_reference(y, x, lora_a, lora_b, meta: LoraBatchMeta, slice_offsets: tuple[int, ...]) -> None:
    """Add each token's LoRA delta into y, one token at a time (the oracle for the fast paths).

    Shapes:
      y: [T, out] updated in place; x: [T, in]
      lora_a: [S, num_slices * R, in]  (stacked A of each output slice; scaling NOT here)
      lora_b: [S, out, R]               (scaling folded in; rows of slice i are slice_offsets[i]:[i+1])
      slice_offsets: python ints, len num_slices + 1, [0, ..., out]

    Semantics:
      for t in range(T):
          s = token_slots[t]
          if s < 0: continue
          h = lora_a[s] @ x[t]                          # [num_slices * R], fp32 accumulate
          for i in range(num_slices):
              lo, hi = slice_offsets[i], slice_offsets[i+1]
              y[t, lo:hi] += lora_b[s, lo:hi, :] @ h[i*R:(i+1)*R]
    """
    rank = check_lora_shapes(y, x, lora_a, lora_b, meta, slice_offsets)
    for t, s in enumerate(meta.token_slots.tolist()):
        if s < 0:
            continue
        h = lora_a[s].float() @ x[t].float()
        for i, (lo, hi) in enumerate(itertools.pairwise(slice_offsets)):
            y[t, lo:hi] += lora_b[s, lo:hi, :].float() @ h[i * rank : (i + 1) * rank]


def lora_apply_torch(y, x, lora_a, lora_b, meta: LoraBatchMeta, slice_offsets: tuple[int, ...]) -> None:
    """Same semantics as `lora_apply_reference`, vectorised per token; graph-capturable (no host syncs,
    static shapes). Gathers each token's A and B, in chunks of tokens to bound the temporary memory."""
    rank = check_lora_shapes(y, x, lora_a, lora_b, meta, slice_offsets)
    num_tokens = x.shape[0]
    if num_tokens == 0 or lora_a.shape[0] == 0:
        return
    per_token = lora_a.shape[1] * lora_a.shape[2] + lora_b.shape[1] * lora_b.shape[2]
    chunk = max(1, _GATHER_BUDGET // per_token)
    for t0 in range(0, num_tokens, chunk):
        t1 = min(t0 + chunk, num_tokens)
        slots = meta.token_slots[t0:t1]
        idx = slots.clamp(min=0).long()
        h = torch.bmm(lora_a[idx].float(), x[t0:t1].float().unsqueeze(-1))  # [t, num_slices * R, 1]
        is_active = (slots >= 0).unsqueeze(-1)  # [t, 1]
        for i, (lo, hi) in enumerate(itertools.pairwise(slice_offsets)):
            if lo == hi:
                continue
            b = lora_b[idx, lo:hi, :].float()  # [t, hi - lo, R]
            delta = torch.bmm(b, h[:, i * rank : (i + 1) * rank]).squeeze(-1)  # [t, hi - lo]
            # where, not a multiply: a slot-0 stand-in for -1 tokens may hold non-finite garbage.
            y[t0:t1, lo:hi] += torch.where(is_active, delta, 0.0)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton can be imported (it is not a declared dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def lora_apply(y, x, lora_a, lora_b, meta: LoraBatchMeta, slice_offsets: tuple[int, ...]) -> None:
    """Add the per-token LoRA delta into y (semantics of `lora_apply_reference`): Triton on CUDA,
    torch elsewhere."""
    if y.is_cuda and USE_TRITON_LORA and triton_available():
        from server.model.triton_lora import lora_apply_triton

        lora_apply_triton(y, x, lora_a, lora_b, meta, slice_offsets)
    else:
        lora_apply_torch(y, x, lora_a, lora_b, meta, slice_offsets)
