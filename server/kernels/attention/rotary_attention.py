"""The decode step's attention from the qkv projection's output: rotary, the new k/v's cache write and paged
attention, in one Triton kernel on CUDA (server.kernels.attention.triton_attention), else glue_ops' rotary op then
attention_ops' decode attention. It sits above both modules (neither imports it), so that attention_ops needs
nothing from glue_ops."""

from __future__ import annotations

import os

import torch

from server.kernels.attention.attention_ops import kernel_shapes, paged_decode_attention
from server.kernels.backends import triton_available
from server.kernels.glue import glue_ops
from server.kernels.split_sums import SplitSums

# One Triton kernel on CUDA (LORAPLEX_FUSED_DECODE_ROTARY=0: the rotary kernel, then attention, for A/B timing)
FUSED_DECODE_ROTARY = os.environ.get("LORAPLEX_FUSED_DECODE_ROTARY", "1") == "1"


def rotary_decode_attention(qkv: torch.Tensor | SplitSums, num_q_heads: int, num_kv_heads: int, head_dim: int, rope,
                            k_cache, v_cache, slot_mapping, block_tables, context_lens, scale: float):
    """glue_ops.qkv_rotary_write_kv, then paged_decode_attention ([B, Hq, D]), for a decode step whose rows each
    read only their own new k and v (one token a row, no prompt chunk beside them): one Triton kernel on CUDA,
    which writes a row's k and v and reads them back without waiting for the other rows' programs."""
    if FUSED_DECODE_ROTARY and qkv.device.type == "cuda" and kernel_shapes(head_dim, k_cache) and triton_available():
        from server.kernels.attention.triton_attention import rotary_decode_attention_triton

        return rotary_decode_attention_triton(qkv, num_q_heads, rope, k_cache, v_cache, slot_mapping, block_tables,
                                              context_lens, scale)
    q, _, _ = glue_ops.qkv_rotary_write_kv(qkv, num_q_heads, num_kv_heads, head_dim, rope, k_cache, v_cache,
                                           slot_mapping)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
