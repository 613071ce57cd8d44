"""The NF4 start-up tuning's picks on disk (server/kernels/nf4/tuning_cache.py) and nf4_autotune taking them: a restart
with the same key times nothing it stored; any change to the key, a broken file or entry times afresh."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import torch

from server.kernels.nf4 import cuda_nf4_wgmma, nf4_autotune, nf4_dispatch, tuning_cache
from server.kernels.nf4.nf4_dispatch import Choice
from tests.unit.test_nf4_autotune import clean_choices  # noqa: F401  (autouse: the process's picks cleared around each)

PICKS = {((6144, 4096), 32): Choice("wgmma", (("resident_warpgroups", 6), ("pairs", 1))),
         ((4096, 4096), 128): Choice("wgmma", (("bulk_x", 1),)), ((4096, 14336), 16): Choice("dequant")}


def test_picks_round_trip_under_their_key_only(tmp_path):
    path = tmp_path / "sub" / tuning_cache.FILE_NAME  # the folder is made
    tuning_cache.save(path, "k1", PICKS)
    assert tuning_cache.load(path, "k1") == PICKS
    assert tuning_cache.load(path, "k2") == {}
    tuning_cache.save(path, "k2", {((1, 2), 3): Choice("wide")})
    assert tuning_cache.load(path, "k1") == PICKS  # another key's picks kept beside
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # no temporary left


def test_the_newest_keys_are_kept(tmp_path):
    path = tmp_path / tuning_cache.FILE_NAME
    for i in range(tuning_cache.KEEP + 2):
        tuning_cache.save(path, f"k{i}", {((i, 1), 16): Choice("wide")})
    tuning_cache.save(path, "k2", {((2, 1), 16): Choice("dequant")})  # rewritten: now the newest
    keys = list(json.loads(path.read_text()))
    assert len(keys) == tuning_cache.KEEP and keys[-1] == "k2" and "k0" not in keys and "k1" not in keys
    assert tuning_cache.load(path, "k2") == {((2, 1), 16): Choice("dequant")}


def test_a_broken_file_or_entry_is_timed_afresh(tmp_path, caplog):
    path = tmp_path / tuning_cache.FILE_NAME
    assert tuning_cache.load(path, "k") == {}  # no file yet: nothing logged
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert tuning_cache.load(path, "k") == {}
    assert "unreadable" in caplog.text
    tuning_cache.save(path, "k", PICKS)  # written anew
    assert tuning_cache.load(path, "k") == PICKS
    data = json.loads(path.read_text())
    data["k"]["12@16"] = ["wide", []]  # no "out,in"
    data["k"]["8,8@16"] = ["wgmma", [["block_warps", "four"]]]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        assert tuning_cache.load(path, "k") == PICKS
    assert "'12@16' skipped" in caplog.text and "'8,8@16' skipped" in caplog.text


def test_picks_that_are_not_a_mapping_are_timed_afresh(tmp_path, caplog):
    path = tmp_path / tuning_cache.FILE_NAME
    path.write_text(json.dumps({"k": ["wide"]}))
    with caplog.at_level(logging.WARNING):
        assert tuning_cache.load(path, "k") == {}
    assert "not a mapping" in caplog.text


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch, caplog):
    path = tmp_path / tuning_cache.FILE_NAME
    tuning_cache.save(path, "k", PICKS)

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tuning_cache.json, "dump", full_disk)
    with caplog.at_level(logging.WARNING):
        tuning_cache.save(path, "k2", PICKS)
    assert "not written" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]
    assert tuning_cache.load(path, "k") == PICKS  # the file as it was


def test_an_unwritable_cache_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        tuning_cache.save(blocker / tuning_cache.FILE_NAME, "k", PICKS)  # its folder is a file
    assert "not written" in caplog.text


def test_the_key_follows_the_gpu_software_switches_and_sources():
    base = dict(device_name="NVIDIA H200", num_sms=132, capability=(9, 0), torch_version="2.11.0",
                cuda_version="13.0", dtype="torch.bfloat16", environ={"HOME": "/root"}, digest="d1")
    key = tuning_cache.cache_key(**base)
    assert tuning_cache.cache_key(**base) == key
    for same in ({"HOME": "/other", "LORAPLEX_DECODE_TUNING": "x"}, {"LORAPLEX_NF4_TUNING_CACHE": "1"},
                 {"LORAPLEX_NF4_AUTOTUNE": "1"}):
        assert tuning_cache.cache_key(**{**base, "environ": same}) == key, same
    for change in ({"device_name": "NVIDIA H100 80GB HBM3"}, {"num_sms": 114}, {"capability": (8, 0)},
                   {"torch_version": "2.13.0"}, {"cuda_version": None}, {"dtype": "torch.float16"},
                   {"digest": "d2"}, {"environ": {"LORAPLEX_NF4_CLUSTER_SUM": "0"}},
                   {"environ": {"LORAPLEX_PDL": "0"}}):
        assert tuning_cache.cache_key(**{**base, **change}) != key, change


def test_the_sources_digest_follows_each_file(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("kernel")
    (tmp_path / "b.py").write_text("launch")
    digest = tuning_cache.sources_digest(tmp_path, ("csrc", "b.py"))
    assert tuning_cache.sources_digest(tmp_path, ("csrc", "b.py")) == digest
    (tmp_path / "csrc" / "a.cu").write_text("kernel 2")
    changed = tuning_cache.sources_digest(tmp_path, ("csrc", "b.py"))
    assert changed != digest
    (tmp_path / "csrc" / "c.cuh").write_text("")
    with_header = tuning_cache.sources_digest(tmp_path, ("csrc", "b.py"))
    assert with_header != changed
    (tmp_path / "csrc" / "__pycache__").mkdir()
    (tmp_path / "csrc" / "__pycache__" / "d.pyc").write_bytes(b"bytecode")  # Python's caches come and go
    assert tuning_cache.sources_digest(tmp_path, ("csrc", "b.py")) == with_header
    server_dir = tuning_cache._SERVER_DIR
    assert all((server_dir / name).exists() for name in tuning_cache.SOURCES)  # a renamed source fails here


def test_tune_takes_the_stored_picks_untimed_and_stores_what_it_timed(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    timed = []
    monkeypatch.setattr(nf4_dispatch, "nf4_linear_cuda", lambda x, *a, kernel, **kw: timed.append((x.shape[0], kernel))
                        or {"dequant": 2.0, "wide": 1.0}[kernel])
    path = tmp_path / tuning_cache.FILE_NAME
    tuning_cache.save(path, "key", {((256, 128), 16): Choice("dequant")})  # an earlier start's pick (not the fastest)
    layers = {(256, 128): [_fake_layer((256, 128))]}
    chosen = nf4_autotune.tune(layers, 132, timer=lambda calls: calls[0](), rows_list=(16, 32), cache=path, key="key")
    assert chosen == {((256, 128), 16): Choice("dequant"), ((256, 128), 32): Choice("wide")}
    assert {rows for rows, _ in timed} == {32}  # the stored row count was not timed
    assert tuning_cache.load(path, "key") == chosen

    nf4_dispatch.TUNED.clear()  # a restart: everything from the file, nothing timed, the file untouched
    timed.clear()
    before = path.stat().st_mtime_ns
    assert nf4_autotune.tune(layers, 132, timer=lambda calls: calls[0](), rows_list=(16, 32), cache=path,
                             key="key") == chosen
    assert timed == [] and path.stat().st_mtime_ns == before

    nf4_dispatch.TUNED.clear()  # another key (another GPU, build or switch): timed afresh
    assert nf4_autotune.tune(layers, 132, timer=lambda calls: calls[0](), rows_list=(16, 32), cache=path,
                             key="other")[((256, 128), 16)] == Choice("wide")


def test_a_stored_pick_that_is_no_candidate_here_is_timed(monkeypatch, tmp_path, caplog):
    """A hand-edited file, or a build without the wgmma kernels: the stored pick is never run."""
    monkeypatch.setattr(cuda_nf4_wgmma, "wgmma_supported", lambda: False)
    monkeypatch.setattr(nf4_dispatch, "nf4_linear_cuda",
                        lambda x, *a, kernel, **kw: {"dequant": 2.0, "wide": 1.0}[kernel])
    path = tmp_path / tuning_cache.FILE_NAME
    tuning_cache.save(path, "key", {((256, 128), 16): Choice("wgmma", (("block_warps", 4),)),
                                    ((256, 128), 32): Choice("bogus")})
    with caplog.at_level(logging.WARNING):
        chosen = nf4_autotune.tune({(256, 128): [_fake_layer((256, 128))]}, 132, timer=lambda calls: calls[0](),
                                   rows_list=(16, 32), cache=path, key="key")
    assert chosen == {((256, 128), 16): Choice("wide"), ((256, 128), 32): Choice("wide")}
    assert "is no candidate here" in caplog.text
    assert tuning_cache.load(path, "key") == chosen  # replaced by what was timed


def test_the_engine_cache_path_is_under_cache_dir_unless_switched_off(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAPLEX_NF4_TUNING_CACHE", raising=False)
    assert nf4_autotune.cache_path(tmp_path) == tmp_path / tuning_cache.FILE_NAME
    monkeypatch.setenv("LORAPLEX_NF4_TUNING_CACHE", "0")
    assert nf4_autotune.cache_path(tmp_path) is None


def _fake_layer(shape):
    return SimpleNamespace(codes=torch.zeros(1), absmax_f=torch.zeros(1), tiled=None, compute_dtype=torch.float32,
                           quant_state=SimpleNamespace(code=torch.zeros(16)))
