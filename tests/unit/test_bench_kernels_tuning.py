"""bench.kernels off the GPU: at the engine's tuned row counts ``ours`` is what the engine's start-up tuning picks
for the shape, by the same nf4_autotune.tune over the layer's weight copies; elsewhere, or with the tuning off,
the rules."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from bench import kernels
from server.model import nf4_autotune, nf4_dispatch


def test_ours_is_tuned_as_the_engine_tunes_at_its_row_counts(monkeypatch):
    monkeypatch.setattr(nf4_dispatch, "TUNED", {})
    seen = []

    def tune(layers, num_sms, rows_list):
        ((shape, weights),) = layers.items()
        seen.append((shape, rows_list, [(w.codes, w.tiled) for w in weights], num_sms))
        chosen = {(shape, rows_list[0]): nf4_dispatch.Choice("wgmma", (("stage_blocks", 2),))}
        nf4_dispatch.TUNED.update(chosen)
        return chosen

    monkeypatch.setattr(nf4_autotune, "tune", tune)
    monkeypatch.setattr(kernels, "_mma_available", lambda: True)
    monkeypatch.setitem(sys.modules, "server.model.triton_nf4", SimpleNamespace(device_num_sms=lambda index: 132))
    layer = SimpleNamespace(shape=(256, 128), nf4=[("codes", "absmax", "state", "tiled"), ("c1", "a1", "s1", "t1")])
    monkeypatch.setattr(nf4_autotune, "AUTOTUNE", True)
    assert kernels.tune_like_the_engine(layer, 32) == "wgmma stage_blocks=2"
    assert seen == [((256, 128), (32,), [("codes", "tiled"), ("c1", "t1")], 132)]  # every weight copy
    assert kernels.tune_like_the_engine(layer, 33) is None  # not a decode-graph bucket: the rules
    monkeypatch.setattr(nf4_autotune, "AUTOTUNE", False)  # LORAPLEX_NF4_AUTOTUNE=0
    assert kernels.tune_like_the_engine(layer, 32) is None
    assert len(seen) == 1
