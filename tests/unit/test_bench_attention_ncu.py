"""bench.attention_ncu's inputs (CPU): the engine's batch-32 decode shape, each row's new token at its last position."""

from __future__ import annotations

import torch

from bench.attention_ncu import decode_inputs
from server.kernels.attention.attention_ops import paged_decode_attention_reference
from server.kernels.glue import glue_ops


def test_decode_inputs_are_a_decode_step_of_the_8b_shape():
    qkv, rope, slots, k_cache, v_cache, tables, lens = decode_inputs(4, 40, device="cpu")
    assert qkv.partials.shape == (2, 4, (32 + 2 * 8) * 128) and rope.shape == (4, 2, 128)
    assert k_cache.shape == v_cache.shape and k_cache.shape[1:] == (16, 8, 128) and lens.tolist() == [40] * 4
    blocks = tables[:, :3]
    assert len(set(blocks.flatten().tolist())) == 12  # no block shared between rows
    assert slots.tolist() == [int(blocks[row, 2]) * 16 + 7 for row in range(4)]  # position 39 of each row
    q, _, _ = glue_ops.qkv_rotary_write_kv(qkv, 32, 8, 128, rope, k_cache, v_cache, slots)
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 128**-0.5)
    assert out.shape == (4, 32, 128) and torch.isfinite(out).all()
