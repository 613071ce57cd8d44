"""One-launch varlen prefill attention on CUDA against the per-sequence SDPA path (bf16)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from server.kernels.attention.attention_ops import prefill_attention, prefill_attention_torch  # noqa: E402
from tests.unit.test_prefill_attention import _case  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("lengths, prefixes, head_dim", [
    ([300, 17, 2048, 5], [0, 0, 0, 0], 128), ([64, 64, 31], [0, 0, 500], 64), ([1000, 200], [48, 0], 128),
    ([100, 50, 70, 70, 3], [0, 30, 0, 0, 0], 128),  # fresh prompts on both sides of a cached one, an equal pair
])  # fmt: skip
def test_dispatch_matches_sdpa(lengths, prefixes, head_dim):
    q, k, v, k_cache, v_cache, seqs = _case(lengths, prefixes, num_q_heads=32, num_kv_heads=8, head_dim=head_dim)
    q, k, v, k_cache, v_cache = (t.to("cuda", torch.bfloat16) for t in (q, k, v, k_cache, v_cache))
    seqs = [type(s)(s.q_start, s.q_len, s.ctx_len, s.block_table.cuda()) for s in seqs]
    by_len: dict[int, list[int]] = {}
    for s in seqs:
        if s.ctx_len == s.q_len:
            by_len.setdefault(s.q_len, []).append(s.q_start)
    groups = [(torch.tensor(st)[:, None] + torch.arange(n)[None, :]).cuda() for n, st in by_len.items()]
    expected = prefill_attention_torch(q, k, v, k_cache, v_cache, seqs, groups, head_dim**-0.5)
    got = prefill_attention(q, k, v, k_cache, v_cache, seqs, groups, head_dim**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype, head_dim, lengths", [
    (torch.bfloat16, 128, [1 + (i * 97) % 400 for i in range(12)]), (torch.float16, 64, [1 + (i * 97) % 400 for i in
    range(12)]), (torch.bfloat16, 128, [1]),  # a lone one-token prompt
])  # fmt: skip
def test_flash_varlen_matches_the_reference_for_fresh_prompts(dtype, head_dim, lengths):
    """Fresh prompts of unequal lengths (bench.prefill's shape, scaled down): one varlen call against SDPA one prompt at
    a time; k and v are column slices of one qkv projection, as the model makes them (rows strided)."""
    from server.kernels.attention import flash_varlen

    q, k, v, k_cache, v_cache, seqs = _case(lengths, [0] * len(lengths), num_q_heads=32, num_kv_heads=8,
                                            head_dim=head_dim)
    q, k, v, k_cache, v_cache = (t.to("cuda", dtype) for t in (q, k, v, k_cache, v_cache))
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q, k, v = (part.unflatten(1, (-1, head_dim)) for part in qkv.split([32 * head_dim, 8 * head_dim, 8 * head_dim], 1))
    # rows strided as the model passes them; a dimension of size one may carry any stride (torch normalizes it
    # in views: 1,024 for one row on the H200), so only several rows can show it
    assert k.stride(0) == qkv.stride(0) or k.shape[0] == 1
    seqs = [type(s)(s.q_start, s.q_len, s.ctx_len, s.block_table.cuda()) for s in seqs]
    assert flash_varlen.available(q)
    expected = prefill_attention_torch(q, k, v, k_cache, v_cache, seqs, None, head_dim**-0.5)
    got = torch.full_like(q, float("nan"))
    flash_varlen.fresh_attention(q, k, v, seqs, head_dim**-0.5, got, memo={})
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
