"""bench.dequant_pieces' ratios from its per-layer timings (the timing itself needs a GPU)."""

from __future__ import annotations

import math

import pytest

from bench.dequant_pieces import ratios


def _entry(model, layer, rows, bf16, whole, **pieces):
    return {"model": model, "layer": layer, "rows": rows, "us": {"bf16": bf16, "whole": whole, **pieces}}


def test_ratios_are_geometric_means_over_the_8b_linears_at_128_rows():
    layers = [
        _entry("8b", "gate_up", 128, 60.0, 150.0, **{"16mb": 75.0}),
        _entry("8b", "o", 128, 12.0, 24.0),  # one piece at 16 MB: counts at its whole time
        _entry("8b", "gate_up", 192, 1.0, 100.0, **{"16mb": 1.0}),  # other row counts and models are left out
        _entry("1b", "gate_up", 128, 1.0, 100.0, **{"16mb": 1.0}),
    ]
    got = ratios(layers, [16.0])
    assert got["dequant_over_bf16_m128"] == pytest.approx(math.sqrt(2.5 * 2.0))
    assert got["pieces_16mb_over_bf16_m128"] == pytest.approx(math.sqrt(1.25 * 2.0))


def test_ratios_without_8b_rows_are_none():
    assert ratios([_entry("1b", "o", 128, 1.0, 2.0)], [8.0]) == {"dequant_over_bf16_m128": None,
                                                                 "pieces_8mb_over_bf16_m128": None}


def test_a_layer_measures_every_piece_size_that_splits_it(monkeypatch):
    """CPU smoke run under the Triton interpreter, the timer replaced by one call of each function: a weight of 320
    rows in pieces of 128 rows (0.05 MB at 192 bf16 inputs a row) matches the whole path; a piece size at least the
    whole weight is skipped."""
    from tests.unit.triton_interp import interpreted

    interpreted("server.model.triton_nf4_dequant")
    from bench import dequant_pieces

    def once(fns, reps=10):
        for fn in fns:
            fn()
        return 1.0

    monkeypatch.setattr(dequant_pieces, "DEVICE", "cpu")
    monkeypatch.setattr(dequant_pieces, "time_calls", once)
    monkeypatch.setattr(dequant_pieces, "L2_DEFEAT_BYTES", 0)
    [entry] = dequant_pieces.measure_layer(192, 320, [5], [0.05, 1.0])
    assert entry["rows"] == 5 and set(entry["us"]) == {"bf16", "whole", "0.05mb"}
    # bf16 outputs near 10-20 (ulp 0.0625-0.125) of the same products, maybe summed in another order: a piece
    # written to the wrong columns, or not at all, differs by whole units
    assert entry["max_abs_diff"]["0.05mb"] <= 0.25
