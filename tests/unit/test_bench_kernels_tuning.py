"""bench.kernels off the GPU: at the engine's tuned row counts ``ours`` is what the engine's start-up tuning picks
for the shape, by the same nf4_autotune.tune over the layer's weight copies; elsewhere, or with the tuning off,
the rules."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from bench import kernels
from server.kernels.nf4 import nf4_autotune, nf4_dispatch


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
    monkeypatch.setitem(sys.modules, "server.kernels.nf4.triton_nf4", SimpleNamespace(device_num_sms=lambda index: 132))
    layer = SimpleNamespace(shape=(256, 128), nf4=[("codes", "absmax", "state", "tiled"), ("c1", "a1", "s1", "t1")])
    monkeypatch.setattr(nf4_autotune, "AUTOTUNE", True)
    assert kernels.tune_like_the_engine(layer, 32) == "wgmma stage_blocks=2"
    assert seen == [((256, 128), (32,), [("codes", "tiled"), ("c1", "t1")], 132)]  # every weight copy
    assert kernels.tune_like_the_engine(layer, 33) is None  # not a decode-graph bucket: the rules
    monkeypatch.setattr(nf4_autotune, "AUTOTUNE", False)  # LORAPLEX_NF4_AUTOTUNE=0
    assert kernels.tune_like_the_engine(layer, 32) is None
    assert len(seen) == 1


def test_the_run_records_how_many_clusters_of_the_cluster_sum_fit(monkeypatch):
    """bench.kernels' cluster_occupancy: the extension's count for clusters of 2, 4 and 8 blocks; a note where the
    build has no wgmma kernels, and the error's text (not a failed run) where the query fails."""
    from server.kernels.nf4 import cuda_nf4, cuda_nf4_wgmma

    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    assert kernels.cluster_occupancy() == "no wgmma kernels in this build"
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: True)
    monkeypatch.setattr(cuda_nf4, "extension", lambda: SimpleNamespace(nf4_wgmma_cluster_occupancy=lambda s: 132 // s))
    assert kernels.cluster_occupancy() == {2: 66, 4: 33, 8: 16}

    def fails(splits):
        raise RuntimeError("cluster misconfiguration")

    monkeypatch.setattr(cuda_nf4, "extension", lambda: SimpleNamespace(nf4_wgmma_cluster_occupancy=fails))
    assert "cluster misconfiguration" in kernels.cluster_occupancy()
