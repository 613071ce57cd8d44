"""bench.wgmma_sol off the GPU: its ratios are each probe's geometric mean over the four 8B shapes at 32 rows (and
at 128, the 128-token instance's), over the whole kernel and over bf16, and stay null while a shape is missing; rows
pick the instance."""

from __future__ import annotations

import pytest

from bench import wgmma_sol


def _entry(layer: str, rows: int, kernel: float, scale: float) -> dict:
    us = {probe: kernel * scale for probe in wgmma_sol.PROBES}
    us.update(kernel=kernel, bf16=2 * kernel)
    return {"model": "8b", "layer": layer, "rows": rows, "us": us}


def test_ratios_are_geometric_means_over_the_8b_shapes_at_32_rows():
    layers = [_entry(name, 32, kernel, 0.5) for name, kernel in (("qkv", 10), ("o", 8), ("gate_up", 40), ("down", 20))]
    layers.append(_entry("gate_up", 16, 40, 0.1))  # other rows: left out
    got = wgmma_sol.ratios(layers)
    assert got["wsol_kernel_over_kernel_m32"] == 1.0 and got["wsol_kernel_over_bf16_m32"] == 0.5
    assert got["wsol_loads_over_kernel_m32"] == pytest.approx(0.5)
    assert got["wsol_dequant_loads_over_bf16_m32"] == pytest.approx(0.25)
    assert got["wsol_no_x_over_kernel_m128"] is None  # no 128-row entries


def test_ratios_at_128_rows_stand_apart_from_32():
    shapes = (("qkv", 10), ("o", 8), ("gate_up", 40), ("down", 20))
    layers = [_entry(name, rows, kernel, scale) for name, kernel in shapes for rows, scale in ((32, 0.5), (128, 0.25))]
    got = wgmma_sol.ratios(layers)
    assert got["wsol_no_x_over_kernel_m32"] == pytest.approx(0.5)
    assert got["wsol_no_x_over_kernel_m128"] == pytest.approx(0.25)
    assert got["wsol_no_x_over_bf16_m128"] == pytest.approx(0.125)


def test_rows_pick_the_32_or_the_128_token_instance():
    assert [wgmma_sol.block_tokens_for(rows) for rows in (1, 32, 33, 128)] == [32, 32, 128, 128]
    assert set(wgmma_sol.INSTANCES) == {32, 128}


def test_ratios_stay_null_without_every_shape():
    got = wgmma_sol.ratios([_entry("qkv", 32, 10, 0.5)])
    assert set(got.values()) == {None}
