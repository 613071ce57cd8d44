"""Fused glue kernels on CUDA against the torch references (run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from server.kernels.attention.attention_ops import write_kv_cache  # noqa: E402
from server.kernels.glue import glue_ops, triton_glue  # noqa: E402

pytestmark = pytest.mark.gpu


def _within_ulps(got, expected, ulps=2):
    ulp = 2**-7
    diff = (got.float() - expected.float()).abs()
    assert (diff <= ulps * ulp * expected.float().abs().clamp(min=1e-2)).all(), diff.max().item()


@pytest.mark.parametrize("rows, cols", [(1, 2048), (32, 4096), (5, 576), (3, 100)])
def test_add_rmsnorm(rows, cols):
    h, d = (torch.randn(rows, cols, device="cuda").to(torch.bfloat16) for _ in range(2))
    w = torch.rand(cols, device="cuda").to(torch.bfloat16)
    got_h, got_y = triton_glue.add_rmsnorm(h, d, w, 1e-5)
    assert torch.equal(got_h, h + d)
    _within_ulps(got_y, glue_ops.rmsnorm_reference(h + d, w, 1e-5))


@pytest.mark.parametrize("rows, cols, splits", [(1, 4096, 16), (32, 2048, 4), (32, 4096, 8)])
def test_add_rmsnorm_sums_split_partials_bit_for_bit(rows, cols, splits):
    """o_proj's / down_proj's split-K partials summed by the residual add + norm (LORAPLEX_NORM_SPLIT_SUMS): bit for
    bit the summed output handed to it."""
    from server.kernels.split_sums import SplitSums

    h = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    sums = SplitSums(torch.randn(splits, rows, cols, device="cuda"), torch.randn(cols, device="cuda").bfloat16(),
                     torch.bfloat16)
    w = torch.rand(cols, device="cuda").to(torch.bfloat16)
    got, want = triton_glue.add_rmsnorm(h, sums, w, 1e-5), triton_glue.add_rmsnorm(h, sums.materialize(), w, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("rows, cols", [(1, 4096), (32, 2048), (300, 576)])
def test_embed_rmsnorm_equals_the_lookup_then_the_norm_kernel(rows, cols):
    """The first layer's norm gathering the embedding rows: bit for bit F.embedding, then the plain norm kernel."""
    table = torch.randn(1000, cols, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, 1000, (rows,), device="cuda")
    w = torch.rand(cols, device="cuda").to(torch.bfloat16)
    got_h, got_y = triton_glue.embed_rmsnorm(ids, table, w, 1e-5)
    h = torch.nn.functional.embedding(ids, table)
    assert torch.equal(got_h, h) and torch.equal(got_y, triton_glue.add_rmsnorm(h, None, w, 1e-5)[1])


@pytest.mark.parametrize("rows, inter", [(1, 8192), (32, 14336), (7, 1536)])
def test_silu_mul(rows, inter):
    gu = (torch.randn(rows, 2 * inter, device="cuda") * 3).to(torch.bfloat16)
    _within_ulps(triton_glue.silu_mul(gu), glue_ops.silu_mul_reference(gu))


@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 64), (32, 8, 128), (9, 3, 64)])
def test_rotary_write_kv(hq, hkv, d):
    tokens = 33
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda").to(torch.bfloat16)
    split = lambda t: (t[:, : hq * d].view(tokens, hq, d), t[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d),  # noqa: E731
                       t[:, (hq + hkv) * d:].view(tokens, hkv, d))
    angles = torch.rand(tokens, 1, d // 2, device="cuda") * 100
    emb = torch.cat([angles, angles], -1)
    rope = torch.cat([emb.cos(), emb.sin()], 1)
    slots = torch.randperm(64, device="cuda")[:tokens]
    slots[3] = -1
    caches = [torch.zeros(4, 16, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q0, k0, v0 = split(qkv.clone())
    q_ref = glue_ops.apply_rotary_reference(q0, rope[:, 0:1], rope[:, 1:2])
    k_ref = glue_ops.apply_rotary_reference(k0, rope[:, 0:1], rope[:, 1:2])
    write_kv_cache(k_ref, v0, caches[0], caches[1], slots)
    q, k, v = split(qkv.clone())
    triton_glue.rotary_write_kv(q, k, v, rope, caches[2], caches[3], slots)
    _within_ulps(q, q_ref)
    _within_ulps(k, k_ref)
    _within_ulps(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])
