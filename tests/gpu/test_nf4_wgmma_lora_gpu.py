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


def _pool(slots: list[int], ranks: list[int], max_rank: int, num_slices: int, in_features: int, seed: int):
    """A pool of len(ranks) slots (each at offset max_rank x slot, NaN-free random A), its layout and a step's meta."""
    from server.model.lora_meta import SlotLayout, decode_lora_meta

    gen = torch.Generator(device="cuda").manual_seed(seed)
    lora_a = (torch.randn(num_slices * max_rank * len(ranks), in_features, device="cuda", generator=gen) * 0.05)
    layout = SlotLayout.from_lists([max_rank * s for s in range(len(ranks))], ranks, max_rank, "cuda")
    meta = decode_lora_meta(torch.tensor(slots, dtype=torch.int32, device="cuda"))
    return lora_a.to(torch.bfloat16), layout, meta


def _expected_h(x, lora_a, layout, slots, num_slices):
    h = torch.zeros(x.shape[0], num_slices * layout.max_rank, dtype=torch.float64, device="cuda")
    for t, s in enumerate(slots):
        if s >= 0:
            lo, r = num_slices * layout.host_offsets[s], layout.host_ranks[s]
            h[t, : num_slices * r] = lora_a[lo : lo + num_slices * r].double() @ x[t].double()
    return h


@pytest.mark.parametrize("rows, block_tokens, warpgroups, split_k, num_slices, ranks", [
    (32, 32, 6, 2, 3, [16] * 32), (32, 32, 5, 1, 2, [16] * 32), (20, 32, 4, 3, 1, [8, 16, 4, 0, 16]),
    (16, 16, 5, 1, 3, [16, 2]), (9, 16, 7, 2, 2, [16] * 12), (45, 32, 6, 2, 1, [16, 16, 16]),
])  # fmt: skip
def test_lora_units_leave_the_output_and_compute_the_shrink(rows, block_tokens, warpgroups, split_k, num_slices,
                                                            ranks):
    """Mixed ranks (an empty slot among them), tokens without an adapter, several tokens a slot and slots no token
    reads (whose 64-row groups the kernel skips)."""
    from server.model import cuda_nf4_lora, cuda_nf4_wgmma, triton_lora

    if not cuda_nf4_wgmma.wgmma_supported():
        pytest.skip("warpgroup MMA needs an sm_90a build (H100, H200)")
    tiled, shape, table = _layer(2048, 600)
    live = [s for s, r in enumerate(ranks) if r > 0]
    slots = [-1 if t % 7 == 3 else live[(5 * t) % len(live)] for t in range(rows)]
    lora_a, layout, meta = _pool(slots, ranks, 16, num_slices, 2048, rows * len(ranks))
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    bias = torch.randn(600, device="cuda", generator=gen).to(torch.bfloat16)
    run = lambda xs, **kw: cuda_nf4_lora.nf4_wgmma_lora(  # noqa: E731
        xs, tiled, shape, table, lora_a, layout, meta, num_slices, bias=bias, warpgroups=warpgroups,
        block_tokens=block_tokens, split_k=split_k, **kw)
    y, h = run(x)
    plain = cuda_nf4_wgmma.nf4_wgmma(x, tiled, shape, table, bias, split_k=split_k, block_tokens=block_tokens,
                                     resident_warpgroups=warpgroups, pairs=True)
    assert torch.equal(y, plain)
    want = _expected_h(x, lora_a, layout, slots, num_slices)
    torch.testing.assert_close(h.double(), want, atol=1e-4, rtol=1e-4)
    shrink = triton_lora.lora_shrink(x, lora_a, layout, meta, num_slices)  # the layout it stands in for
    for t, s in enumerate(slots):
        if s >= 0:
            n = num_slices * layout.host_ranks[s]
            torch.testing.assert_close(h[t, :n], shrink[t, :n], atol=1e-4, rtol=1e-4)
    if split_k > 1:
        deferred, h2 = run(x, defer_sum=True)
        assert torch.equal(deferred.partials, cuda_nf4_wgmma.nf4_wgmma(
            x, tiled, shape, table, bias, split_k=split_k, block_tokens=block_tokens, resident_warpgroups=warpgroups,
            pairs=True, defer_sum=True).partials)
        torch.testing.assert_close(h2.double(), want, atol=1e-4, rtol=1e-4)
    # replayed from a graph with new inputs and the h zeroed inside it: the units follow the new x
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, static_h = run(static_x)
    for seed in range(3):
        fresh = torch.randn(rows, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        static_x.copy_(fresh.to(torch.bfloat16))
        graph.replay()
        torch.testing.assert_close(static_h.double(), _expected_h(static_x, lora_a, layout, slots, num_slices),
                                   atol=1e-4, rtol=1e-4)


def test_seven_warpgroups_at_32_tokens_are_refused():
    """The instance ptxas serialized (cuda_nf4_lora.MAX_WARPGROUPS_32) is not built: asked for, the op says so."""
    from server.model import cuda_nf4_lora, cuda_nf4_wgmma

    if not cuda_nf4_wgmma.wgmma_supported():
        pytest.skip("warpgroup MMA needs an sm_90a build (H100, H200)")
    tiled, shape, table = _layer(2048, 600)
    lora_a, layout, meta = _pool([0] * 32, [16], 16, 1, 2048, 0)
    x = torch.randn(32, 2048, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 6 warpgroups"):
        cuda_nf4_lora.nf4_wgmma_lora(x, tiled, shape, table, lora_a, layout, meta, 1, warpgroups=7)

