"""Paged KV cache ops: writing new keys/values into the cache, and single-token decode attention.

Cache layout: k_cache / v_cache are [num_blocks, block_size, Hkv, D]; a sequence's token p lives in
block block_tables[row, p // block_size] at offset p % block_size. Query head h reads kv head
h // (Hq // Hkv) (grouped-query attention).
"""

from __future__ import annotations

import torch

from server.kernels.backends import triton_available


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Store k/v [T, Hkv, D] at flat cache slots (block * block_size + offset); slot -1 = skip.

    No host sync and static shapes (graph-capturable): rows marked -1 rewrite what the first real row
    writes (same slot, same value), so duplicate indices stay deterministic; with no real row they
    rewrite flat slot 0 with its own contents.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    is_real = slot_mapping >= 0
    first_real = torch.argmax(is_real.to(torch.int32))  # 0 when there is none
    rows = torch.where(is_real, torch.arange(num_tokens, device=slot_mapping.device), first_real)
    slots = slot_mapping[rows]
    has_slot = (slots >= 0).view(-1, 1, 1)
    slots = slots.clamp(min=0)
    for new, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
        values = torch.where(has_slot, new[rows].to(cache.dtype), flat[:1])
        flat.index_copy_(0, slots, values)


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale: float):
    """Decode attention over a paged cache, one row and head at a time (the oracle for the fast paths).

    Shapes: q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
    int32; context_lens [B] int32 (tokens in the cache for the row, the current one included; 0 = a
    padding row, whose output is zeros). Returns [B, Hq, D] in q.dtype.

    Semantics:
      for b in range(B):
          n = context_lens[b]
          keys, values = tokens 0..n-1 of row b gathered through block_tables[b]   # [n, Hkv, D]
          for h in range(Hq):
              g = h // (Hq // Hkv)
              p = softmax(scale * keys[:, g] @ q[b, h])          # fp32
              out[b, h] = p @ values[:, g]
    """
    num_rows, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        for h in range(num_q_heads):
            p = torch.softmax(scale * (keys[:, h // group] @ q[b, h].float()), dim=0)
            out[b, h] = (p @ values[:, h // group]).to(q.dtype)
    return out


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale: float):
    """Vectorised `paged_decode_attention_reference`: gathers all max_blocks blocks of every row and masks
    past each row's length, so its cost follows max_blocks, not the real lengths. Graph-capturable."""
    num_rows, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    group = num_q_heads // num_kv_heads
    blocks = block_tables.long().clamp(0, num_blocks - 1)  # padding entries may hold anything
    keys = k_cache[blocks].flatten(1, 2).float()  # [B, L, Hkv, D]
    values = v_cache[blocks].flatten(1, 2).float()
    qg = q.float().view(num_rows, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, keys) * scale  # [B, Hkv, G, L]
    positions = torch.arange(keys.shape[1], device=q.device)
    is_valid = (positions[None, :] < context_lens[:, None].long()).view(num_rows, 1, 1, -1)
    probs = torch.softmax(scores.masked_fill(~is_valid, float("-inf")), dim=-1)
    probs = torch.where(is_valid, probs, 0.0)  # padding rows: softmax of all -inf is NaN
    out = torch.einsum("bhgl,blhd->bhgd", probs, values)
    return out.reshape(num_rows, num_q_heads, head_dim).to(q.dtype)


def kernel_shapes(head_dim: int, k_cache: torch.Tensor) -> bool:
    """Whether the Triton attention kernels take this head width and cache block size (64 | 128, 16 | 32)."""
    return head_dim in (64, 128) and k_cache.shape[1] in (16, 32)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float):
    """Decode attention over a paged cache (semantics of the reference): Triton on CUDA, torch elsewhere."""
    if q.is_cuda and kernel_shapes(q.shape[-1], k_cache) and triton_available():
        from server.kernels.attention.triton_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention_torch(q, k, v, k_cache, v_cache, prefill_seqs, fresh_groups, scale: float) -> torch.Tensor:
    """Causal prefill attention, torch SDPA: one call per group of equal-length fresh prompts
    (``fresh_groups``: [num_seqs, length] token rows), one per other sequence (a chunk after a cached
    prefix reads the prefix from the cache). q [T, Hq, D], k/v [T, Hkv, D] of this step's tokens."""
    from torch.nn import functional as F

    out = torch.empty_like(q)
    for rows in fresh_groups or ():
        qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # [num_seqs, heads, length, D]
        attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[rows] = attended.transpose(1, 2)
    for seq in _ungrouped(prefill_seqs, fresh_groups):
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        qs = q[rows].transpose(0, 1)  # [heads, q_len, D]
        if seq.ctx_len == seq.q_len:  # no cached prefix: attend to this chunk, causally
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            mask, causal = None, True
        else:  # chunked prefill: the prefix comes from the cache
            ks, vs = _gather_context(k_cache, v_cache, seq.block_table, seq.ctx_len)
            q_pos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len, device=q.device)
            mask = torch.arange(seq.ctx_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        out[rows] = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        ).transpose(0, 1)
    return out


def prefill_attention(q, k, v, k_cache, v_cache, prefill_seqs, fresh_groups, scale: float,
                      memo: dict | None = None) -> torch.Tensor:
    """Prefill attention (semantics of prefill_attention_torch). On CUDA, groups of two or more fresh
    prompts of equal length keep one SDPA call each (flash kernels); the other fresh prompts (no cached
    prefix) go to one flash-attention varlen call (server.kernels.attention.flash_varlen) where it runs (16-bit), and
    every sequence left, whatever its length or cached prefix, to one Triton launch
    (server.kernels.attention.triton_prefill_attention) instead of a call each. The chunk's K/V must already be in the
    cache. `memo`: the step's dict shared by its layers (launch metadata is built once per step)."""
    if not (q.is_cuda and kernel_shapes(q.shape[-1], k_cache) and triton_available()):
        return prefill_attention_torch(q, k, v, k_cache, v_cache, prefill_seqs, fresh_groups, scale)
    from server.kernels.attention import flash_varlen
    from server.kernels.attention.triton_prefill_attention import prefill_attention_triton

    shared = [rows for rows in fresh_groups or () if rows.shape[0] > 1]  # shapes are host facts: no sync
    fresh_counts: dict[int, int] = {}
    for seq in prefill_seqs:
        if seq.ctx_len == seq.q_len:
            fresh_counts[seq.q_len] = fresh_counts.get(seq.q_len, 0) + 1
    others = [s for s in prefill_seqs if s.ctx_len != s.q_len or fresh_counts[s.q_len] < 2 or not shared]
    fresh = [s for s in others if s.ctx_len == s.q_len] if flash_varlen.available(q) else []
    cached = [s for s in others if s.ctx_len != s.q_len] if fresh else others
    if shared:
        out = prefill_attention_torch(q, k, v, k_cache, v_cache, [], shared, scale)
    else:  # the Triton launch's output (every row allocated) takes the other rows too
        out = prefill_attention_triton(q, k_cache, v_cache, cached, scale, memo=memo)
    if fresh:
        flash_varlen.fresh_attention(q, k, v, fresh, scale, out, memo)
    if shared and cached:
        rest = prefill_attention_triton(q, k_cache, v_cache, cached, scale, memo=memo)
        for seq in cached:
            out[seq.q_start : seq.q_start + seq.q_len] = rest[seq.q_start : seq.q_start + seq.q_len]
    return out


def _ungrouped(prefill_seqs, fresh_groups):
    """The sequences that no fresh group covers (fresh_groups covers every whole, uncached prompt)."""
    return (s for s in prefill_seqs if fresh_groups is None or s.ctx_len != s.q_len)


def _gather_context(k_cache, v_cache, block_table, ctx_len):
    block_size = k_cache.shape[1]
    index = (block_table[:, None] * block_size + torch.arange(block_size, device=block_table.device)).flatten()
    index = index[:ctx_len]
    ks = k_cache.view(-1, *k_cache.shape[2:])[index].transpose(0, 1)
    vs = v_cache.view(-1, *v_cache.shape[2:])[index].transpose(0, 1)
    return ks, vs
