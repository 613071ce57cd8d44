"""The non-matmul work of a decoder layer ("glue"): torch references and the fused-kernel dispatch.

A decode step's GPU time was ~2 ms of small unfused kernels at 1B batch 32 (H200 profile, issue 13):
norms in fp32 with casts, rotary, the activation, residual adds and the KV-cache write, each several
launches. Each op here is one Triton kernel on CUDA (server.kernels.glue.triton_glue) and this torch code
elsewhere; both compute the same function, up to float rounding order.

Semantics (x.dtype = model dtype; every "rounded" is a cast to it):
    add_rmsnorm(h, delta, w):  h2 = rounded(h + delta)
                               y  = rounded(w * rounded(h2.f32 * rsqrt(mean(h2.f32 ** 2) + eps)))
                               -> (h2, y);   rmsnorm(x, w) is the same with no add.
    silu_mul(gate_up [T, 2I]): gate, up = halves;  rounded(rounded(silu(gate.f32)) * up)
    rotary_write_kv(q, k, v, rope, caches, slots): q, k [T, H, D] rotated in place,
                               x <- rounded(x.f32 * cos + rotate_half(x).f32 * sin), rotate_half(x) = (-x2, x1);
                               then k, v stored at cache slot slots[t] (block * block_size + offset), -1 = skip.
silu_mul and qkv_rotary_write_kv also take the projection's output as unsummed split-K partials
(server.kernels.split_sums.SplitSums): the same function of the summed output.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from server.kernels.split_sums import SplitSums, materialized


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] -> rounded(weight * rounded(x.f32 * rsqrt(mean(x.f32^2) + eps)))."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, 1, D]; rotate-half convention of transformers."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _kernels(x: torch.Tensor | SplitSums):
    """The Triton glue module when x is on CUDA and triton imports, else None."""
    if x.device.type != "cuda":
        return None
    try:
        from server.kernels.glue import triton_glue
    except ImportError:
        return None
    return triton_glue


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernels = _kernels(x)
    if kernels is None:
        return rmsnorm_reference(x, weight, eps)
    return kernels.add_rmsnorm(x, None, weight, eps)[1]


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | SplitSums, weight: torch.Tensor, eps: float):
    """(h + delta, rmsnorm(h + delta)): the residual add fused into the next norm; delta may be a linear's split-K
    partials (summed as the norm kernel reads them)."""
    kernels = _kernels(h)
    if kernels is None:
        h = h + materialized(delta)
        return h, rmsnorm_reference(h, weight, eps)
    return kernels.add_rmsnorm(h, delta, weight, eps)


def embed_rmsnorm(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, eps: float):
    """(table[ids], rmsnorm(table[ids])): the embedding lookup fused into the first layer's input norm."""
    kernels = _kernels(table)
    if kernels is None:
        h = F.embedding(ids, table)
        return h, rmsnorm_reference(h, weight, eps)
    return kernels.embed_rmsnorm(ids, table, weight, eps)


def silu_mul(gate_up, shrink=None) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2I], or of the output a SplitSums or PendingLora stands for. `shrink`
    (act_shrink.ShrinkAhead): also add down_proj's LoRA shrink of the result into shrink.h."""
    kernels = _kernels(gate_up)
    if kernels is None:
        act = silu_mul_reference(materialized(gate_up))
        if shrink is not None:
            from server.kernels.lora.act_shrink import shrink_reference

            shrink_reference(act, shrink)
        return act
    return kernels.silu_mul(gate_up, shrink=shrink)


def rotary_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping):
    """Rotate q and k ([T, H, D] views) and store k, v in the paged cache; returns the rotated (q, k)."""
    kernels = _kernels(q)
    if kernels is None:
        from server.kernels.attention.attention_ops import write_kv_cache

        cos, sin = rope[:, 0:1], rope[:, 1:2]
        q, k = apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin)
        write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        return q, k
    kernels.rotary_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping)
    return q, k


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Views q [T, Hq, D], k and v [T, Hkv, D] of the qkv projection's output [T, (Hq + 2 Hkv) D]."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(-1, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
    return q, k, qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)


def qkv_rotary_write_kv(qkv: torch.Tensor | SplitSums, num_heads: int, num_kv_heads: int, head_dim: int, rope,
                        k_cache, v_cache, slot_mapping):
    """Split the qkv projection's output [T, (Hq + 2 Hkv) D] (or its split-K partials) into q, k, v [T, H, D],
    rotate q and k and store k, v in the paged cache; returns (q, k, v). Partials are summed by the rotary kernel as
    it reads them, into a fresh output."""
    kernels = _kernels(qkv)
    sums = qkv if isinstance(qkv, SplitSums) and kernels is not None else None
    out = materialized(qkv) if sums is None else torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = split_qkv(out, num_heads, num_kv_heads, head_dim)
    if sums is None:
        q, k = rotary_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping)
    else:
        kernels.rotary_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping, sums=sums)
    return q, k, v
