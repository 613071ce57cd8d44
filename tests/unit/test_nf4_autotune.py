"""Start-up kernel tuning for NF4 weights (server/kernels/nf4/nf4_autotune.py): the candidates, the choice, and the
dispatch running the choice for exactly the tuned shape and row count (CPU: the kernels replaced by recorders)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.kernels.nf4 import cuda_nf4, cuda_nf4_wgmma, nf4_autotune, nf4_dispatch
from server.kernels.nf4.nf4_dispatch import Choice


@pytest.fixture(autouse=True)
def clean_choices():
    nf4_dispatch.TUNED.clear()
    yield
    nf4_dispatch.TUNED.clear()


def test_candidates_are_the_rules_kernels_and_the_wgmma_variants(monkeypatch):
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    assert nf4_autotune.candidates(32, (28672, 4096), 132) == [Choice("dequant"), Choice("wide")]
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: True)
    assert nf4_autotune.candidates(32, (28672, 4096), 132) == [
        Choice("dequant"), Choice("wide"), Choice("wgmma"), Choice("wgmma", (("block_warps", 4),)),
        Choice("wgmma", (("stage_blocks", 2),)), Choice("wgmma", (("resident_warpgroups", 4),)),
        Choice("wgmma", (("resident_warpgroups", 5),)), Choice("wgmma", (("resident_warpgroups", 6),)),
        Choice("wgmma", (("resident_warpgroups", 7),)), Choice("wgmma", (("resident_warpgroups", 4), ("pairs", True))),
        Choice("wgmma", (("resident_warpgroups", 5), ("pairs", True))),
        Choice("wgmma", (("resident_warpgroups", 6), ("pairs", True))),
        Choice("wgmma", (("resident_warpgroups", 7), ("pairs", True)))]
    at_128 = nf4_autotune.candidates(128, (28672, 4096), 132)  # default 128 tokens: 32 and 64 forced, not 256
    assert Choice("wgmma", (("block_tokens", 32),)) in at_128 and Choice("wgmma", (("block_tokens", 64),)) in at_128
    assert Choice("wgmma", (("block_tokens", 256),)) not in at_128
    assert Choice("wgmma", (("block_warps", 4),)) in at_128 and Choice("wgmma", (("stage_blocks", 2),)) not in at_128
    assert Choice("wgmma", (("resident_warpgroups", 7),)) not in at_128  # x resident: 16 or 32 block tokens only
    at_16 = nf4_autotune.candidates(16, (28672, 4096), 132)  # and at up to 16 rows its 16-token x tile, pair table
    assert [c for c in at_16 if dict(c.options).get("block_tokens") == 16] == [
        Choice("wgmma", (("resident_warpgroups", w), ("block_tokens", 16), ("pairs", True))) for w in (4, 5, 6, 7)]
    assert not [c for c in at_128 + nf4_autotune.candidates(17, (28672, 4096), 132)
                if dict(c.options).get("block_tokens") == 16]
    assert Choice("wgmma", (("block_warps", 4),)) not in nf4_autotune.candidates(200, (28672, 4096), 132)
    bulk_x = [Choice("wgmma", (("bulk_x", True),)), Choice("wgmma", (("bulk_x", True), ("cluster_sum", True))),
              Choice("wgmma", (("bulk_x", True), ("block_warps", 16)))]
    for rows in (65, 128, 200, 256):  # x by the TMA unit from 65 rows: 128 tokens in 8 and 16 warps, in 8 warps also
        # with the splits summed in a cluster
        assert [c for c in nf4_autotune.candidates(rows, (4096, 4096), 132) if "bulk_x" in dict(c.options)] == bulk_x
    assert not [c for c in nf4_autotune.candidates(64, (4096, 4096), 132) if "bulk_x" in dict(c.options)]
    monkeypatch.setattr(nf4_dispatch, "BULK_X", False)  # LORAPLEX_NF4_BULK_X=0: none, for a clean A/B
    assert not [c for c in nf4_autotune.candidates(128, (4096, 4096), 132) if "bulk_x" in dict(c.options)]
    monkeypatch.setattr(nf4_dispatch, "BULK_X", True)
    monkeypatch.setattr(nf4_autotune, "BULK_X_64", True)  # and the 64-token block when asked for
    bulk_64 = [Choice("wgmma", (("bulk_x", True), ("block_tokens", 64)))]
    bulk_at = lambda rows: [c for c in nf4_autotune.candidates(rows, (4096, 4096), 132)  # noqa: E731
                            if "bulk_x" in dict(c.options)]
    assert bulk_at(128) == bulk_x + bulk_64 and bulk_at(48) == bulk_64 and bulk_at(32) == []  # from 33 rows
    monkeypatch.setattr(nf4_autotune, "CLUSTER_SUM", False)  # LORAPLEX_NF4_CLUSTER_SUM=0: no cluster sum
    assert bulk_at(128) == [bulk_x[0], bulk_x[2]] + bulk_64


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_below_16_rows_the_rules_one_row_kernel_meets_the_16_token_x_tile(monkeypatch, rows):
    """At the decode buckets under 16 rows the candidates are the rules' kernel (gemv, gemv_pairs or tile) and the
    x-resident kernel's 16-token tile with the pair table at 4-7 warpgroups; without wgmma, the rules' alone."""
    rule = Choice(nf4_dispatch.kernel_for(rows, (28672, 4096), num_sms=132))
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    assert nf4_autotune.candidates(rows, (28672, 4096), 132) == [rule]
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: True)
    assert nf4_autotune.candidates(rows, (28672, 4096), 132) == [rule] + [
        Choice("wgmma", (("resident_warpgroups", w), ("block_tokens", 16), ("pairs", True))) for w in (4, 5, 6, 7)]


def _fake_layer(shape):
    return SimpleNamespace(codes=torch.zeros(shape[0] * shape[1] // 2, 1, dtype=torch.uint8),
                           absmax_f=torch.ones(shape[0] * shape[1] // 64), tiled=(torch.zeros(1), torch.zeros(1)),
                           quant_state=SimpleNamespace(code=torch.zeros(16)), compute_dtype=torch.bfloat16)


def test_tune_records_the_fastest_candidate_and_skips_one_that_fails(monkeypatch):
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: True)
    cost = {("dequant", ()): 3.0, ("wide", ()): 2.0, ("wgmma", ()): 1.5, ("wgmma", (("block_warps", 4),)): 1.0}
    seen = []

    def fake_linear(x, codes, absmax_f, shape, table, bias, state, kernel, tiled, options):
        seen.append((shape, x.shape, kernel, options))
        if kernel == "wgmma" and options:
            raise RuntimeError("no such instance in this build")  # the fastest on paper fails: skipped
        return cost[(kernel, tuple(options.items()))]

    monkeypatch.setattr(nf4_dispatch, "nf4_linear_cuda", fake_linear)
    shapes = {(256, 128): [_fake_layer((256, 128))], (64, 256): [_fake_layer((64, 256))]}
    chosen = nf4_autotune.tune(shapes, 132, timer=lambda calls: calls[0](), rows_list=(16, 32))
    assert chosen == {(shape, rows): Choice("wgmma") for shape in shapes for rows in (16, 32)}
    assert chosen == nf4_dispatch.TUNED
    assert {(shape, x_shape[0]) for shape, x_shape, _, _ in seen} == {(s, r) for s in shapes for r in (16, 32)}
    assert all(x_shape[1] == shape[1] for shape, x_shape, _, _ in seen)  # x has the weight's in_features


def test_a_shape_tuned_already_in_the_process_keeps_its_pick(monkeypatch):
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    timed = []
    monkeypatch.setattr(nf4_dispatch, "nf4_linear_cuda", lambda x, *a, kernel, **kw: timed.append((x.shape[0], kernel))
                        or {"dequant": 2.0, "wide": 1.0}[kernel])
    nf4_dispatch.TUNED[((256, 128), 16)] = Choice("dequant")  # an earlier engine's pick
    chosen = nf4_autotune.tune({(256, 128): [_fake_layer((256, 128))]}, 132, timer=lambda calls: calls[0](),
                               rows_list=(16, 32))
    assert chosen == {((256, 128), 32): Choice("wide")}  # only the row count not tuned yet was timed
    assert {rows for rows, _ in timed} == {32}
    assert nf4_autotune._flush is None  # the timer's L2 flush buffer released by tune itself
    assert dict(nf4_dispatch.TUNED) == {((256, 128), 16): Choice("dequant"), ((256, 128), 32): Choice("wide")}


def test_each_candidate_is_timed_over_every_layer_of_the_shape(monkeypatch):
    """A shape's layers (the engine passes up to TUNE_LAYERS of the model's) each run the candidate once in
    the timer's calls, with one x; the timer's figure picks the winner."""
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    ran = []
    monkeypatch.setattr(nf4_dispatch, "nf4_linear_cuda", lambda x, codes, *a, kernel, **kw: ran.append((id(codes),
                                                                                                        kernel, x)))
    group = [_fake_layer((256, 128)) for _ in range(3)]
    timed = []

    def timer(calls):
        for call in calls:
            call()
        timed.append(len(calls))
        return {"dequant": 2.0, "wide": 1.0}[ran[-1][1]]

    chosen = nf4_autotune.tune({(256, 128): group}, 132, timer=timer, rows_list=(32,))
    assert chosen == {((256, 128), 32): Choice("wide")} and timed == [3, 3]
    assert [codes for codes, kernel, _ in ran if kernel == "wide"] == [id(layer.codes) for layer in group]
    assert len({id(x) for _, _, x in ran}) == 1 and ran[0][2].shape == (32, 128)


def test_tune_model_groups_up_to_tune_layers_of_each_shape(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "server.kernels.nf4.triton_nf4", SimpleNamespace(device_num_sms=lambda index: 132))
    seen = {}
    monkeypatch.setattr(nf4_autotune, "tune", lambda layers, num_sms, cache, key: seen.update(layers) or
                        {(shape, 16): Choice("wide") for shape in layers})

    def linear(out_features, in_features):
        module = torch.nn.Module()
        module.is_quantized, module.tiled = True, (torch.zeros(1), torch.zeros(1))
        module.out_features, module.in_features, module.codes = out_features, in_features, torch.zeros(1)
        return module

    model = torch.nn.ModuleList([linear(256, 128) for _ in range(nf4_autotune.TUNE_LAYERS + 3)] + [linear(64, 256)])
    summary = nf4_autotune.tune_model(model)
    assert {shape: len(group) for shape, group in seen.items()} == {(256, 128): nf4_autotune.TUNE_LAYERS,
                                                                   (64, 256): 1}
    assert seen[(256, 128)][0] is model[0] and "256x128@16: wide" in summary


def test_the_dispatch_runs_the_tuned_choice_for_that_shape_and_row_count_only(monkeypatch):
    import sys

    calls = []  # the dispatch's SM count comes from the Triton module (absent from the CPU test venv)
    monkeypatch.setitem(sys.modules, "server.kernels.nf4.triton_nf4", SimpleNamespace(device_num_sms=lambda index: 132))
    monkeypatch.setattr(cuda_nf4_wgmma, "nf4_wgmma", lambda *a, **kw: calls.append(("wgmma", kw)) or "wgmma")
    monkeypatch.setattr(cuda_nf4, "nf4_wide", lambda *a, **kw: calls.append(("wide", kw)) or "wide")
    monkeypatch.setattr(nf4_dispatch, "kernel_for", lambda rows, shape, table=None, num_sms=132: "wide")
    nf4_dispatch.TUNED[((256, 128), 32)] = Choice("wgmma", (("block_tokens", 64), ("block_warps", 4)))
    layer = _fake_layer((256, 128))

    def run(rows, shape=(256, 128)):
        return nf4_dispatch.nf4_linear_cuda(torch.zeros(rows, shape[1]), layer.codes, layer.absmax_f, shape,
                                            layer.quant_state.code, None, tiled=layer.tiled)

    assert run(32) == "wgmma" and calls[-1][1]["block_tokens"] == 64 and calls[-1][1]["block_warps"] == 4
    assert run(16) == "wide"  # a row count not tuned: the rules
    assert run(32, shape=(64, 128)) == "wide"  # another shape: the rules
    forced = nf4_dispatch.nf4_linear_cuda(torch.zeros(32, 128), layer.codes, layer.absmax_f, (256, 128),
                                          layer.quant_state.code, None, kernel="wide", tiled=layer.tiled)
    assert forced == "wide"  # a forced kernel (benchmarks, tests) wins over the tuning


@pytest.mark.parametrize("bulk_x, rows, shape, expected", [
    (True, 128, (28672, 4096), {"bulk_x": True}), (True, 256, (28672, 4096), {"bulk_x": True}),
    (True, 65, (4096, 4096), {"bulk_x": True}),  # 32 row groups: the default block would be 64 tokens
    (True, 128, (2048, 8192), {"bulk_x": True}),
    (True, 128, (16384, 2048), {}),  # 2,048 inputs: the default block stays
    (True, 64, (28672, 4096), {}),
    (False, 128, (28672, 4096), {}),  # LORAPLEX_NF4_BULK_X=0
])  # fmt: skip
def test_the_rules_wgmma_calls_take_bulk_x_past_64_rows_on_4096_inputs(monkeypatch, bulk_x, rows, shape,
                                                                                 expected):
    import sys

    calls = []
    monkeypatch.setitem(sys.modules, "server.kernels.nf4.triton_nf4", SimpleNamespace(device_num_sms=lambda index: 132))
    monkeypatch.setattr(cuda_nf4_wgmma, "nf4_wgmma", lambda *a, **kw: calls.append(kw) or "wgmma")
    monkeypatch.setattr(nf4_dispatch, "kernel_for", lambda rows, shape, table=None, num_sms=132: "wgmma")
    monkeypatch.setattr(nf4_dispatch, "BULK_X", bulk_x)
    assert nf4_dispatch.rule_options("wgmma", rows, shape) == expected
    assert nf4_dispatch.rule_options("dequant", rows, shape) == {}
    layer = _fake_layer(shape)
    assert nf4_dispatch.nf4_linear_cuda(torch.zeros(rows, shape[1]), layer.codes, layer.absmax_f, shape,
                                        layer.quant_state.code, None, tiled=layer.tiled) == "wgmma"
    assert {k: v for k, v in calls[-1].items() if k == "bulk_x"} == expected
    nf4_dispatch.nf4_linear_cuda(torch.zeros(rows, shape[1]), layer.codes, layer.absmax_f, shape,
                                 layer.quant_state.code, None, kernel="wgmma", tiled=layer.tiled)
    assert "bulk_x" not in calls[-1]  # a forced kernel runs its default block


def test_on_by_default():
    import os

    assert os.environ.get("LORAPLEX_NF4_AUTOTUNE") is None and nf4_autotune.AUTOTUNE is True


def test_the_l2_flush_buffer_falls_back_to_warm_timing_where_it_does_not_fit(monkeypatch):
    """Twice the L2, allocated once and released after tuning; where the memory is taken (a KV cache sized near the
    whole GPU), an empty buffer: the engine still starts, its candidates timed on a warm L2."""
    sizes = []

    def empty(size, dtype, device):
        sizes.append(size)
        if size > 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(0, dtype=dtype)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=50 << 20))
    monkeypatch.setattr(torch, "empty", empty)
    nf4_autotune.release_l2_flush_buffer()
    flush = nf4_autotune._l2_flush_buffer()
    assert sizes == [100 << 20, 0] and flush.numel() == 0
    assert nf4_autotune._l2_flush_buffer() is flush  # kept until released
    nf4_autotune.release_l2_flush_buffer()
    assert nf4_autotune._flush is None
