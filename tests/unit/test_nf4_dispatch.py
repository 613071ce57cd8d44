"""CPU checks of the NF4 dispatch's choices (the kernels themselves are tested in tests/gpu)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from server.kernels.nf4 import cuda_nf4, cuda_nf4_gemv, cuda_nf4_wgmma, nf4_dispatch


@pytest.mark.parametrize("rows, expected", [(1, "tile"), (8, "tile"), (11, "tile"), (12, "wide"), (16, "wide"),
                                             (17, "wide"), (128, "wide"), (129, "dequant"), (4096, "dequant")])
def test_rows_pick_the_measured_kernel(rows, expected):
    assert nf4_dispatch.kernel_for_rows(rows, nf4_dispatch.WITH_CUDA_KERNEL) == expected


@pytest.mark.parametrize("rows, expected", [(1, "bnb"), (2, "bnb"), (3, "fused"), (32, "fused"), (64, "dequant")])
def test_triton_only_table(rows, expected):
    assert nf4_dispatch.kernel_for_rows(rows, nf4_dispatch.TRITON_ONLY) == expected


@pytest.mark.parametrize("out_features, in_features", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                                        (3072, 2048), (576, 576)])
@pytest.mark.parametrize("rows, warps, resident", [(1, 2, 12), (16, 4, 4), (32, 4, 4), (64, 4, 2)])
def test_split_k_fills_waves_within_bounds(out_features, in_features, rows, warps, resident):
    split = cuda_nf4.pick_split_k(rows, out_features, in_features, 132, warps, resident)
    num_blocks = in_features // 64
    assert split == 1 or (split & (split - 1) == 0 and num_blocks // split >= 4)
    assert 8 * split * rows * out_features <= max(8 * rows * out_features, out_features * in_features // 4 * 2)
    ctas = math.ceil(math.ceil(out_features / 16) / warps) * split
    waves = ctas / (resident * 132)
    fill = waves / math.ceil(waves) if waves >= 1 else waves
    if split > 1:  # a split is only taken when it fills its waves better than no split
        ctas1 = math.ceil(math.ceil(out_features / 16) / warps)
        waves1 = ctas1 / (resident * 132)
        assert fill > (waves1 / math.ceil(waves1) if waves1 >= 1 else waves1)


def test_kernel_section_reports_targets(tmp_path):
    import json

    from bench.report_kernels import kernel_section

    layers = [{"model": "8b", "layer": name, "rows": rows, "us": {"bf16": 10.0, "ours": 5.0 * (1 + rows / 64)}}
              for name in ("qkv", "o", "gate_up", "down") for rows in (1, 16)]
    (tmp_path / "2026-12-01-gpu-kernels.json").write_text(json.dumps({
        "date": "2026-12-01", "device": "GPU", "command": "python -m bench.kernels", "layers": layers,
        "ratios": {"nf4_over_bf16_m1": 0.51, "nf4_over_bf16_m16": 0.62}}))
    h100 = {"date": "2026-12-05", "device": "NVIDIA H100 80GB HBM3", "command": "python -m bench.kernels",
            "layers": [dict(layer, us={"bf16": 10.0, "ours": 1.0}) for layer in layers],
            "ratios": {"nf4_over_bf16_m1": 0.1, "nf4_over_bf16_m16": 0.1}}
    (tmp_path / "2026-12-05-nvidia-h100-80gb-hbm3-kernels.json").write_text(json.dumps(h100))  # newer, not the H200
    text = "\n".join(kernel_section(tmp_path, {}))
    assert "| `nf4_over_bf16_m1` |" in text and "| 0.51 | **no** |" in text and "h100" not in text
    assert "| 16 | 0.62 |" in text  # 5 * 1.25 / 10



@pytest.mark.parametrize("rows, shape, expected", [
    (64, (2048, 2048), "dequant"), (64, (3072, 2048), "dequant"), (64, (6144, 4096), "wide"),
    (64, (4096, 4096), "wide"), (32, (2048, 2048), "wide"), (1, (2048, 2048), "gemv"), (65, (28672, 4096), "wide"),
    (128, (4096, 14336), "wide"), (128, (6144, 4096), "dequant"), (129, (28672, 4096), "dequant"),
    (128, (16384, 2048), "wide"), (128, (2048, 8192), "dequant"),
])  # fmt: skip
def test_wide_batches_of_small_weights_go_to_dequant(rows, shape, expected):
    """12-32 rows: the wide kernel; 33-64 rows for weights of 16M+ entries, 65-128 rows for 30M+ (the H200
    crossovers)."""
    assert nf4_dispatch.kernel_for(rows, shape, nf4_dispatch.WITH_CUDA_KERNEL) == expected


def test_wide_split_counts_each_token_group_as_a_full_grid(monkeypatch):
    """Passes beyond the first (grid z) take resident places too: their split is chosen as if each SM held
    1/groups of the blocks."""
    monkeypatch.setattr(cuda_nf4, "wide_blocks_per_sm", lambda tiles, per_warp: 4)
    shape = (28672, 4096)
    assert cuda_nf4.wide_split_k(32, shape, 132, 4, 1) == cuda_nf4.pick_split_k(32, *shape, 132, 4, 4)
    assert cuda_nf4.wide_split_k(200, shape, 132, 16, 1) == cuda_nf4.pick_split_k(128, *shape, 132, 4, 2)


@pytest.mark.parametrize("shape, warps", [
    ((6144, 4096), 8), ((4096, 4096), 16), ((4096, 14336), 16),  # 8B qkv, o, down
    ((3072, 2048), 16), ((2048, 8192), 16),  # 1B qkv, down
    ((28672, 4096), None), ((16384, 2048), None),  # gate_up (8B, 1B): too tall for 8 warps a tile in one wave
    ((320, 512), None),  # eight quant blocks: too few for 8 warps of two
])  # fmt: skip
def test_gemv_warps_fill_one_wave_with_two_quant_blocks_a_warp(shape, warps):
    assert cuda_nf4_gemv.gemv_warps(shape, 132) == warps


@pytest.mark.parametrize("shape, group", [
    ((6144, 4096), 8),  # 384 tiles: one round of 528 groups of 8 (8 steps) beats 2 rounds of 4 steps at 16
    ((4096, 4096), 16), ((4096, 14336), 16),  # 256 tiles: one round of 264 groups of 16
    ((28672, 4096), 4),  # 1,792 tiles: two rounds of 1,056 groups of 4, 16 steps each, against 4 rounds of 8 at 8
    ((2048, 2048), 32),  # 128 tiles: one round of 132 groups of 32 (a block a warp; ties to the most warps)
])  # fmt: skip
def test_gemv_pairs_groups_take_the_fewest_steps(shape, group):
    assert cuda_nf4_gemv.gemv_pairs_group_warps(shape, 132) == group


def test_two_token_tiles_count_their_shallower_ring():
    """9-16 rows: the ring is 2 blocks deep, so 2 blocks a warp are a full tile: qkv's 384 tiles take 3 rounds of 2
    blocks at 32 warps a tile (9 steps), as one round of 8 at 8 (ties to the more warps); with one token tile 32
    warps would count the ring's 4 (15)."""
    assert cuda_nf4_gemv.gemv_pairs_group_warps((6144, 4096), 132, 2) == 32
    assert cuda_nf4_gemv.gemv_pairs_group_warps((6144, 4096), 132, 1) == 8


@pytest.mark.parametrize("gemv_rows, rows, shape, expected", [
    (0, 1, (6144, 4096), "tile"), (1, 1, (6144, 4096), "gemv"), (1, 2, (6144, 4096), "tile"),
    (8, 8, (6144, 4096), "gemv"), (8, 1, (28672, 4096), "tile"), (16, 9, (6144, 4096), "tile"),
    (16, 12, (6144, 4096), "wide"),
])  # fmt: skip
def test_gemv_takes_the_tile_kernels_rows_up_to_its_bound_where_it_fills_a_wave(monkeypatch, gemv_rows, rows, shape,
                                                                                 expected):
    monkeypatch.setattr(nf4_dispatch, "GEMV_ROWS", gemv_rows)
    monkeypatch.setattr(nf4_dispatch, "pairs_device", lambda: False)
    assert nf4_dispatch.kernel_for(rows, shape, nf4_dispatch.WITH_CUDA_KERNEL) == expected


@pytest.mark.parametrize("pairs, rows, shape, table, expected", [
    ("1", 1, (6144, 4096), "cuda", "gemv_pairs"), ("1", 8, (28672, 4096), "cuda", "gemv_pairs"),  # gemv's, tile's
    ("1", 9, (6144, 4096), "cuda", "tile"), ("1", 1, (6144, 4096), "triton", "bnb"),
    ("1", 3, (6144, 4096), "triton", "fused"),
    ("auto", 1, (28672, 4096), "cuda", "gemv_pairs"), ("auto", 8, (4096, 14336), "cuda", "gemv_pairs"),
    ("auto", 4, (16384, 2048), "cuda", "gemv_pairs"),  # 1B gate_up, 33.5M
    ("auto", 1, (6144, 4096), "cuda", "gemv_pairs"), ("auto", 1, (4096, 4096), "cuda", "gemv_pairs"),  # 25M, 16.8M
    ("auto", 1, (3072, 2048), "cuda", "gemv"), ("auto", 8, (2048, 2048), "cuda", "gemv"),  # below the bound
    ("auto", 12, (28672, 4096), "cuda", "wide"), ("0", 1, (28672, 4096), "cuda", "tile"),
])  # fmt: skip
def test_pairs_takes_the_gemv_and_tile_rows_up_to_eight_of_large_weights(monkeypatch, pairs, rows, shape, table,
                                                                          expected):
    monkeypatch.setattr(nf4_dispatch, "PAIRS", pairs)
    monkeypatch.setattr(nf4_dispatch, "pairs_device", lambda: True)
    tables = {"cuda": nf4_dispatch.WITH_CUDA_KERNEL, "triton": nf4_dispatch.TRITON_ONLY}
    assert nf4_dispatch.kernel_for(rows, shape, tables[table]) == expected


def test_pairs_needs_a_device_that_gives_its_shared_memory(monkeypatch):
    monkeypatch.setattr(nf4_dispatch, "PAIRS", "1")
    monkeypatch.setattr(nf4_dispatch, "pairs_device", lambda: False)
    assert nf4_dispatch.kernel_for(1, (28672, 4096), nf4_dispatch.WITH_CUDA_KERNEL) == "tile"


@pytest.mark.parametrize("rows, shape, splits", [
    (128, (28672, 4096), 1),  # 448 blocks: past one wave of 2 x 132 already
    (128, (6144, 4096), 2), (128, (4096, 14336), 4), (1024, (4096, 4096), 1),
    (128, (320, 256), 1),  # four quant blocks: no split keeps 4 of them
])  # fmt: skip
def test_gemm_splits_k_until_about_one_wave_of_blocks(rows, shape, splits):
    assert cuda_nf4.gemm_split_k(rows, shape, 132) == splits


@pytest.mark.parametrize("gemm_rows, rows, table, expected", [
    ((0, 0), 300, "cuda", "dequant"), ((65, 512), 300, "cuda", "gemm"), ((65, 512), 64, "cuda", "wide"),
    ((65, 512), 128, "cuda", "gemm"), ((65, 512), 513, "cuda", "dequant"), ((16, 64), 16, "cuda", "gemm"),
    ((16, 64), 8, "cuda", "gemv"), ((65, 512), 300, "triton", "dequant"),
])  # fmt: skip
def test_gemm_takes_wide_and_dequant_rows_only_when_asked(monkeypatch, gemm_rows, rows, table, expected):
    monkeypatch.setattr(nf4_dispatch, "GEMM_ROWS", gemm_rows)
    tables = {"cuda": nf4_dispatch.WITH_CUDA_KERNEL, "triton": nf4_dispatch.TRITON_ONLY}
    assert nf4_dispatch.kernel_for(rows, (6144, 4096), tables[table]) == expected


@pytest.mark.parametrize("wgmma_rows, supported, rows, shape, table, expected", [
    ((17, 256), True, 32, (6144, 4096), "cuda", "wgmma"), ((17, 256), True, 17, (2048, 2048), "cuda", "wgmma"),
    ((17, 256), True, 16, (28672, 4096), "cuda", "wide"), ((12, 256), True, 12, (2048, 2048), "cuda", "wgmma"),
    ((12, 256), True, 11, (28672, 4096), "cuda", "tile"),  # the tile kernel's rows stay its own
    ((12, 256), True, 128, (4096, 4096), "cuda", "wgmma"),  # 16.8M weights from 65 rows
    ((12, 256), True, 128, (3072, 2048), "cuda", "dequant"),  # 6.3M: dequant + cuBLAS
    ((12, 256), True, 200, (28672, 4096), "cuda", "wgmma"), ((12, 256), True, 200, (4096, 14336), "cuda", "wgmma"),
    ((12, 256), True, 200, (4096, 4096), "cuda", "dequant"),  # under 50M weights past 128 rows
    ((12, 256), True, 300, (28672, 4096), "cuda", "dequant"),  # past the rows asked for
    ((12, 512), True, 300, (2048, 2048), "cuda", "wgmma"),  # asked past the table: every weight
    ((0, 0), True, 32, (28672, 4096), "cuda", "wide"), ((12, 256), False, 32, (28672, 4096), "cuda", "wide"),
    ((12, 256), False, 200, (28672, 4096), "cuda", "dequant"),  # no sm_90a build: the table's kernel
    ((12, 256), True, 200, (28672, 4096), "triton", "dequant"),
])  # fmt: skip
def test_wgmma_takes_wide_and_dequant_rows_where_measured_faster(monkeypatch, wgmma_rows, supported, rows, shape,
                                                                  table, expected):
    monkeypatch.setattr(nf4_dispatch, "WGMMA_ROWS", wgmma_rows)
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: supported)
    tables = {"cuda": nf4_dispatch.WITH_CUDA_KERNEL, "triton": nf4_dispatch.TRITON_ONLY}
    assert nf4_dispatch.kernel_for(rows, shape, tables[table]) == expected


@pytest.mark.parametrize("rows, shape, block_tokens, splits", [
    (128, (28672, 4096), 128, 1),  # 224 row groups: past a wave of 2 x 132, and past the SMs at 128 tokens
    (128, (3072, 2048), 64, 5),  # 24 row groups: two 64-token blocks (two an SM) rather than one of 128
    (32, (6144, 4096), 32, 5),  # 48 row groups: 5 splits fill 240 of 264, where doubling stopped at 4
    (200, (4096, 14336), 256, 8), (1024, (4096, 4096), 256, 2),
    (128, (320, 256), 64, 1),  # four quant blocks: no split keeps 4 of them
])  # fmt: skip
def test_wgmma_blocks_and_splits(rows, shape, block_tokens, splits):
    assert cuda_nf4_wgmma.wgmma_block_tokens(rows, shape, 132) == block_tokens
    assert cuda_nf4_wgmma.wgmma_split_k(rows, shape, 132, block_tokens) == splits


@pytest.mark.parametrize("shape, two, three, one_warpgroup", [
    ((6144, 4096), 5, 8, 8),  # 8B qkv: 8 splits of 8 quant blocks fill 384 of 396 (768 of 792 one-warpgroup blocks)
    ((4096, 4096), 8, 8, 8),  # 8B o: 12 would leave ~5 blocks a split; it keeps two-an-SM's 8
    ((4096, 14336), 8, 12, 12), ((28672, 4096), 1, 1, 1), ((16384, 2048), 2, 3, 3),
    ((3072, 2048), 8, 8, 8),  # 1B qkv: 4 a split from 8 splits on, but no fewer splits than two an SM takes
    ((2048, 8192), 16, 16, 16),  # 1B down: 24 would fill the wave; 16 at most (the Triton sums' limit)
    ((512, 8192), 16, 16, 16),  # 4 row groups: 66 would fill the wave, 32 keep 4 blocks each; 16 at most
])  # fmt: skip
def test_wgmma_splits_at_two_and_three_blocks_an_sm(shape, two, three, one_warpgroup):
    assert cuda_nf4_wgmma.wgmma_occupancy(32) == 3 and cuda_nf4_wgmma.wgmma_occupancy(64) == 2
    assert [cuda_nf4_wgmma.wgmma_occupancy(tokens, block_warps=4) for tokens in (32, 64, 128)] == [6, 4, 3]
    assert cuda_nf4_wgmma.wgmma_split_k(32, shape, 132, 32) == two
    assert cuda_nf4_wgmma.wgmma_split_k(32, shape, 132, 32, occupancy=3) == three
    assert cuda_nf4_wgmma.wgmma_split_k(32, shape, 132, 32, occupancy=6, block_warps=4) == one_warpgroup


def test_prepare_settles_the_wgmma_probe_before_any_capture(monkeypatch):
    """The probe (a launch and a host sync) runs in prepare() unless WGMMA_ROWS is off, never inside a step."""
    calls = []
    monkeypatch.setattr(nf4_dispatch, "kernel_table", lambda: nf4_dispatch.WITH_CUDA_KERNEL)
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: calls.append(1) or True)
    monkeypatch.setattr(nf4_dispatch, "WGMMA_ROWS", (0, 0))
    assert "wgmma" not in nf4_dispatch.prepare() and calls == []
    monkeypatch.setattr(nf4_dispatch, "WGMMA_ROWS", (17, 256))
    assert nf4_dispatch.prepare().endswith("17-256:wgmma") and calls == [1]


@pytest.mark.parametrize("setting, block_tokens, expected", [
    ("auto", 8, True), ("auto", 64, True), ("auto", 32, False), ("auto", 128, False),  # the measured wins only
    ("1", 32, True), ("1", 128, True), ("1", 256, False), ("0", 8, False), ("0", 64, False),
])  # fmt: skip
def test_one_wait_is_the_default_where_it_measured_faster(monkeypatch, setting, block_tokens, expected):
    monkeypatch.setattr(cuda_nf4, "ONE_WAIT", setting)
    assert cuda_nf4.one_wait_for(block_tokens) is expected


@pytest.mark.parametrize("options, expected", [
    ({}, (1, 32, 1, 3, 8, False, 0, False)),  # the default 32-token block: three blocks an SM, no one-wait
    ({"stage_blocks": 2}, (1, 32, 2, 0, 8, False, 0, False)),  # two blocks a stage at two blocks an SM
    ({"block_tokens": 64}, (1, 64, 1, 0, 8, True, 0, False)),  # one wait a stage: the 64-token default
    ({"block_tokens": 64, "block_warps": 4}, (1, 64, 1, 0, 4, False, 0, False)),  # not with one warpgroup a block
    ({"resident_warpgroups": 7}, (1, 32, 1, 3, 8, False, 7, False)),  # x resident: 32 block tokens
    ({"resident_warpgroups": 6, "pairs": True}, (1, 32, 1, 3, 8, False, 6, True)),  # and the byte-pair table
    ({"resident_warpgroups": 7, "block_tokens": 16}, (1, 16, 1, 0, 8, False, 7, False)),  # a 16-token x tile
])  # fmt: skip
def test_wgmma_passes_the_variant_to_the_extension_in_its_order(monkeypatch, options, expected):
    """cuda_nf4_wgmma.nf4_wgmma's arguments as csrc's nf4_wgmma takes them (x, codes, scales, table, bias, out,
    split_k, block_tokens, stage_blocks, blocks_per_sm, block_warps, one_wait, resident_warpgroups, pairs,
    defer_sum)."""
    calls = []
    fake = SimpleNamespace(nf4_wgmma=lambda *args: calls.append(args))
    monkeypatch.setattr(cuda_nf4_wgmma, "extension", lambda: fake)
    monkeypatch.setattr(cuda_nf4, "ONE_WAIT", "auto")
    x = torch.zeros(20, 256, dtype=torch.bfloat16)
    cuda_nf4_wgmma.nf4_wgmma(x, (torch.zeros(1), torch.zeros(1)), (300, 256), torch.zeros(16), split_k=1, **options)
    (args,) = calls
    assert args[6:14] == expected and args[14] is False


@pytest.mark.parametrize("block_tokens, block_warps, shape, splits", [
    (None, 8, (28672, 4096), 1), (128, 16, (28672, 4096), 1),
    (64, 8, (28672, 4096), 1),  # 448 blocks past 3 x 132: one split
    (64, 8, (6144, 4096), 4),  # 8B qkv: 96 blocks of 64 tokens; 4 splits fill 384 of 3 x 132 (two an SM's: 2)
])  # fmt: skip
def test_bulk_x_passes_its_block_and_the_splits_of_its_wave(monkeypatch, block_tokens, block_warps, shape, splits):
    """nf4_wgmma(bulk_x=True) calls csrc's nf4_wgmma_bulk_x (x, codes, scales, table, bias, out, split_k, block_tokens,
    block_warps, defer_sum), its splits filling one wave: 8B gate_up at 128 rows has 224 row groups of 8 warps on 2 x
    132 block slots, or 112 of 16 warps on 132 (one split either way), as many as the default 128-token block takes;
    the 64-token block runs three an SM (80 registers)."""
    calls = []
    fake = SimpleNamespace(nf4_wgmma_bulk_x=lambda *args: calls.append(args))
    monkeypatch.setattr(cuda_nf4_wgmma, "extension", lambda: fake)
    x = torch.zeros(128, 4096, dtype=torch.bfloat16)
    cuda_nf4_wgmma.nf4_wgmma(x, (torch.zeros(1), torch.zeros(1)), shape, torch.zeros(16), bulk_x=True,
                             block_tokens=block_tokens, block_warps=block_warps)
    (args,) = calls
    assert args[6:] == (splits, block_tokens or 128, block_warps, False, False)
    assert cuda_nf4_wgmma.wgmma_split_k(128, (28672, 4096), 132, 128) == 1
    down = cuda_nf4_wgmma.wgmma_split_k(128, (4096, 14336), 132, 128, 1, 16)  # 16 row groups of 16 warps: 8 splits
    assert down == 8 == cuda_nf4_wgmma.wgmma_split_k(128, (4096, 14336), 132, 128)


@pytest.mark.parametrize("shape, split_k, splits", [
    ((4096, 14336), None, 8),  # 8B down at 128 rows: 8 splits fill the wave, and a cluster holds 8
    ((2048, 8192), None, 8),  # 1B down: 16 would fill it; a cluster's 8
    ((6144, 4096), None, 4),  # 8B qkv: 5 would fill it; a power of two
    ((6144, 4096), 3, 3),  # as asked
])  # fmt: skip
def test_cluster_sum_passes_at_most_a_clusters_splits(monkeypatch, shape, split_k, splits):
    """nf4_wgmma(bulk_x=True, cluster_sum=True): csrc's nf4_wgmma_bulk_x with cluster_sum set, its default splits the
    wave's down to a power of two and at most the 8 blocks a portable cluster holds; more asked for, a ValueError;
    without bulk_x, a ValueError."""
    calls = []
    fake = SimpleNamespace(nf4_wgmma_bulk_x=lambda *args: calls.append(args))
    monkeypatch.setattr(cuda_nf4_wgmma, "extension", lambda: fake)
    x = torch.zeros(128, shape[1], dtype=torch.bfloat16)
    run = lambda **kw: cuda_nf4_wgmma.nf4_wgmma(x, (torch.zeros(1), torch.zeros(1)), shape,  # noqa: E731
                                                torch.zeros(16), bulk_x=True, cluster_sum=True, **kw)
    run(split_k=split_k)
    assert calls[-1][6:] == (splits, 128, 8, True, False)
    with pytest.raises(ValueError, match="cluster_sum"):
        run(split_k=9)
    with pytest.raises(ValueError, match="cluster_sum"):
        cuda_nf4_wgmma.nf4_wgmma(x, (torch.zeros(1), torch.zeros(1)), shape, torch.zeros(16), cluster_sum=True)
    assert len(calls) == 1
    assert [cuda_nf4_wgmma.cluster_split_k(s) for s in (1, 2, 3, 5, 7, 8, 16)] == [1, 2, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("options", [{"block_tokens": 32}, {"block_tokens": 256}, {"block_warps": 4},
                                     {"block_tokens": 64, "block_warps": 16}, {"one_wait": True}, {"pairs": True},
                                     {"occupancy": 2}, {"stage_blocks": 2}, {"resident_warpgroups": 4}])
def test_bulk_x_refuses_every_other_variant(monkeypatch, options):
    """bulk_x is the 128-token block of 8 or 16 warps or the 64-token block of 8, one quant block a stage: any other
    option is a ValueError, not silently dropped."""
    monkeypatch.setattr(cuda_nf4_wgmma, "extension", lambda: pytest.fail("reached the extension"))
    x = torch.zeros(128, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bulk_x"):
        cuda_nf4_wgmma.nf4_wgmma(x, (torch.zeros(1), torch.zeros(1)), (300, 256), torch.zeros(16), split_k=1,
                                 bulk_x=True, **options)


@pytest.mark.parametrize("block_tokens", [64, 128])
def test_the_resident_kernel_refuses_the_removed_x_tiles(monkeypatch, block_tokens):
    """Its 64- and 128-token tiles lost to the default kernel and are gone: asked for, a ValueError, not a silent
    32-token tile."""
    monkeypatch.setattr(cuda_nf4_wgmma, "extension", lambda: pytest.fail("reached the extension"))
    x = torch.zeros(20, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block tokens"):
        cuda_nf4_wgmma.nf4_wgmma(x, (torch.zeros(1), torch.zeros(1)), (300, 256), torch.zeros(16), split_k=1,
                                 resident_warpgroups=4, block_tokens=block_tokens)


@pytest.mark.parametrize("block_tokens", [16, 32])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("warpgroups", cuda_nf4_wgmma.RESIDENT_WARPGROUPS)
@pytest.mark.parametrize("rows", [16, 32, 64])
@pytest.mark.parametrize("shape", [(28672, 4096), (4096, 14336), (4096, 4096), (6144, 4096), (2048, 8192)])
def test_resident_split_k_keeps_x_within_shared_memory(shape, rows, warpgroups, pairs, block_tokens):
    """Every split's x fits (8B down's 224 quant blocks need at least 5 splits of 45 at 32 block tokens, or 6 of 38
    beside the pair table) and no split exceeds 16."""
    splits = cuda_nf4_wgmma.resident_split_k(rows, shape, 132, warpgroups, pairs, block_tokens)
    assert 1 <= splits <= cuda_nf4_wgmma.WGMMA_MAX_SPLIT_K
    assert -(-(shape[1] // 64) // splits) <= cuda_nf4_wgmma.resident_max_blocks(block_tokens, pairs)


@pytest.mark.parametrize("block_tokens, pairs, expected", [
    (32, False, 56), (32, True, 39), (16, False, 112), (16, True, 80),
])  # fmt: skip
def test_resident_max_blocks_is_what_the_kernels_shared_memory_holds(block_tokens, pairs, expected):
    """x's tiles (block_tokens x 128 bytes) beside the 16-entry table's 1 KB and alignment in 226 KB, or 63 KB below
    the 64 KB pair table at 64 KB and 99 KB past it: csrc nf4_wgmma_resident.cuh's resident_smem_bytes, which the
    launch checks against kResidentSmemMax."""
    assert cuda_nf4_wgmma.resident_max_blocks(block_tokens, pairs) == expected


def test_resident_split_k_gives_8b_gate_up_one_round_at_seven_warpgroups():
    """448 units of 64 rows over 2 splits x 66 blocks x 7 warpgroups (924 slots): one round of 32 quant blocks."""
    assert cuda_nf4_wgmma.resident_split_k(32, (28672, 4096), 132, 7) == 2
