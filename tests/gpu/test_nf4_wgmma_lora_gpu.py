"""cuda_nf4_lora.nf4_wgmma_lora: the x-resident NF4 kernel with LoRA units gives the plain resident kernel's output bit
for bit and h = x @ lora_a^T within fp32 summation order, at 16 and 32 block tokens, split and unsplit K, rows that
fill no 64-row group, tokens that fill no block, and under a CUDA graph's replays."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import bitsandbytes.functional as bnbf  # noqa: E402

from server.model import nf4_ops  # noqa: E402


def _layer(in_features: int, out_features: int):
    from server.model.nf4_layout import tile_pack

    gen = torch.Generator(device="cuda").manual_seed(in_features + 3 * out_features)
    w = torch.randn(out_features, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = nf4_ops.nf4_absmax_float(state).contiguous()
    return tile_pack(codes, absmax, tuple(state.shape)), tuple(state.shape), state.code


@pytest.mark.parametrize("rows, block_tokens, warpgroups, split_k, lora_rows", [
    (32, 32, 6, 2, 1536), (32, 32, 7, 1, 100), (20, 32, 4, 3, 64), (16, 16, 5, 1, 48), (9, 16, 7, 2, 200),
    (45, 32, 6, 2, 130),
])  # fmt: skip
def test_lora_units_leave_the_output_and_compute_the_shrink(rows, block_tokens, warpgroups, split_k, lora_rows):
    from server.model import cuda_nf4_lora, cuda_nf4_wgmma

    if not cuda_nf4_wgmma.wgmma_supported():
        pytest.skip("warpgroup MMA needs an sm_90a build (H100, H200)")
    tiled, shape, table = _layer(2048, 600)
    gen = torch.Generator(device="cuda").manual_seed(rows * lora_rows)
    x = torch.randn(rows, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    lora_a = (torch.randn(lora_rows, 2048, device="cuda", generator=gen) * 0.05).to(torch.bfloat16)
    bias = torch.randn(600, device="cuda", generator=gen).to(torch.bfloat16)
    y, h = cuda_nf4_lora.nf4_wgmma_lora(x, tiled, shape, table, lora_a, bias, warpgroups, block_tokens, split_k)
    plain = cuda_nf4_wgmma.nf4_wgmma(x, tiled, shape, table, bias, split_k=split_k, block_tokens=block_tokens,
                                     resident_warpgroups=warpgroups, pairs=True)
    assert torch.equal(y, plain)
    want = x.double() @ lora_a.double().t()
    assert h.shape == (rows, lora_rows) and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), want, atol=1e-4, rtol=1e-4)
    if split_k > 1:
        deferred, h2 = cuda_nf4_lora.nf4_wgmma_lora(x, tiled, shape, table, lora_a, bias, warpgroups, block_tokens,
                                                    split_k, defer_sum=True)
        assert torch.equal(deferred.partials, cuda_nf4_wgmma.nf4_wgmma(
            x, tiled, shape, table, bias, split_k=split_k, block_tokens=block_tokens, resident_warpgroups=warpgroups,
            pairs=True, defer_sum=True).partials)
        torch.testing.assert_close(h2.double(), want, atol=1e-4, rtol=1e-4)
    # replayed from a graph with new inputs: the zeroed h and the units follow the new x
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, static_h = cuda_nf4_lora.nf4_wgmma_lora(static_x, tiled, shape, table, lora_a, bias, warpgroups,
                                                   block_tokens, split_k)
    for seed in range(3):
        static_x.copy_(torch.randn(rows, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(
            seed)).to(torch.bfloat16))
        graph.replay()
        torch.testing.assert_close(static_h.double(), static_x.double() @ lora_a.double().t(), atol=1e-4, rtol=1e-4)
