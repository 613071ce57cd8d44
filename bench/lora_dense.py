"""The mixed-adapter LoRA of one linear as dense cuBLAS products over the whole pool (bench.lora_kernels' ``dense``).

With one token per adapter and every slot of the pool in use (the mixed-32 decode step), the shrink over the
pool's A is one dense product: h_all = x @ A.T computes every token against every slot's rows, and each token
keeps its own slot's columns (a gather). The expand is one dense product a slice: a token's h scattered into
its slot's rows of an otherwise zero [tokens, capacity] matrix, times the slice's columns of B, added into y.
The bytes are the pool's A and B, as the Triton kernels read them; the flops grow 32x, which the tensor cores do
not notice at 32 tokens. This module times that form against the Triton kernels, so that a dense path is built
only if cuBLAS reads the pool faster than `_shrink_kernel` and the expands do (the question of the
fifty-fourth session: bench/NOTES.md).
"""

from __future__ import annotations

import functools

import torch


def dense_index(offsets: torch.Tensor, token_slots: torch.Tensor, num_slices: int, rank: int):
    """(cols [T, n * rank]: each token's columns of x @ A.T, rows [T, rank]: its rows of B) for slots of equal
    rank at `offsets` (B's rows; a slot's A rows start at n times its offset, as in triton_lora's kernels)."""
    first = offsets[token_slots.long()].long()[:, None]
    ranks = torch.arange(rank, device=first.device)[None, :]
    cols = (num_slices * first + torch.arange(num_slices * rank, device=first.device)[None, :])
    return cols, first + ranks


def dense_shrink(x: torch.Tensor, a: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Each token's h [T, n * rank] in fp32 from one product over the whole pool's A [n * capacity, in]."""
    return _mm_fp32(x, a.t()).gather(1, cols)


def dense_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                 slice_offsets: tuple[int, ...]) -> None:
    """y[:, lo:hi] += H_i @ B[:, lo:hi] for each slice i, in place; H_i is zero but for each token's h of slice i
    (rounded to B's dtype, as the Triton expand rounds it) at its slot's rows."""
    for i in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[i], slice_offsets[i + 1]
        y[:, lo:hi].addmm_(slice_h(h, b, rows, i), b[:, lo:hi])


def slice_h(h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, i: int) -> torch.Tensor:
    """H_i [T, capacity] in B's dtype: zero but for each token's h of slice i at its slot's rows of B."""
    rank = rows.shape[1]
    big = torch.zeros(h.shape[0], b.shape[0], dtype=b.dtype, device=b.device)
    return big.scatter_(1, rows, h[:, i * rank:(i + 1) * rank].to(b.dtype))


def _mm_fp32(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """m1 @ m2 with an fp32 result: cuBLAS writes fp32 from bf16 inputs (mm's out_dtype) where this torch has it;
    elsewhere (the CPU) the inputs are taken to fp32 first."""
    if m1.dtype == torch.float32 or m1.device.type != "cuda":
        return torch.mm(m1.float(), m2.float())
    if _has_out_dtype(m1.device):
        return torch.mm(m1, m2, out_dtype=torch.float32)
    return torch.mm(m1, m2).float()


@functools.cache
def _has_out_dtype(device: torch.device) -> bool:
    """Whether this torch's mm takes out_dtype on `device`: asked once, eagerly, never inside a graph capture."""
    probe = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def dense_apply(pools, x: torch.Tensor, meta, copy: int = 0, index=None):
    """apply(y): the dense form's delta of the pools' copy `copy` added into y in place (``index``: dense_index's
    (cols, rows) for these tokens, else computed here)."""
    cols, rows = index if index is not None else pool_index(pools, meta)
    a, b = pools.a[copy], pools.b[copy]
    return lambda y: dense_expand(y, dense_shrink(x, a, cols), b, rows, pools.slice_offsets)


def pool_index(pools, meta):
    """dense_index for the pools' slots (all of one rank) and the tokens' slots in `meta`."""
    rank = int(pools.layout.ranks[0].item())
    return dense_index(pools.layout.offsets, meta.token_slots, pools.num_slices, rank)


def time_dense(pools, x: torch.Tensor, meta) -> dict:
    """µs per call (bench.kernels.time_calls over the pools' copies) of the dense shrink's product alone
    (``shrink_mm``), the expand's products alone (``expand_mm``, H built once), and the whole apply with its
    gather and scatters (``apply``: dense_apply). Its error against the reference is bench.lora_kernels'
    (apply_error of dense_apply)."""
    from bench.kernels import time_calls

    index = pool_index(pools, meta)
    cols, rows = index
    y = torch.zeros(x.shape[0], pools.slice_offsets[-1], device=x.device, dtype=torch.bfloat16)
    # H of every slice, built once for expand_mm; eager, before any capture, so that mm's out_dtype is asked here
    bigs = [[slice_h(dense_shrink(x, a, cols), b, rows, i) for i in range(pools.num_slices)]
            for a, b in zip(pools.a, pools.b, strict=True)]
    bounds = list(zip(pools.slice_offsets[:-1], pools.slice_offsets[1:], strict=True))

    def expand_mm(per_slice, b):
        for big, (lo, hi) in zip(per_slice, bounds, strict=True):
            y[:, lo:hi].addmm_(big, b[:, lo:hi])

    shrink = [lambda a=a: _mm_fp32(x, a.t()) for a in pools.a]
    expand = [lambda s=s, b=b: expand_mm(s, b) for s, b in zip(bigs, pools.b, strict=True)]
    apply = [lambda f=dense_apply(pools, x, meta, copy, index): f(y) for copy in range(len(pools.a))]
    return {"shrink_mm": round(time_calls(shrink), 2), "expand_mm": round(time_calls(expand), 2),
            "apply": round(time_calls(apply), 2)}
