"""The start-up heap frozen out of the cyclic garbage collector (server/heap.py, Settings.freeze_heap)."""

from __future__ import annotations

import gc
import weakref

import pytest

from server.heap import freeze_startup_heap


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the rest of the test process keeps a collectable heap


def test_freeze_collects_startup_garbage_then_freezes_what_lives(unfrozen):
    garbage, alive = _Node(), _Node()
    dead = weakref.ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    frozen = freeze_startup_heap("test")
    assert dead() is None  # start-up's own cycles were collected, not frozen
    # frozen objects that die later leave the permanent generation (another thread's, the log call's): <=, not ==
    assert before < frozen and gc.get_freeze_count() <= frozen
    assert not any(obj is alive for obj in gc.get_objects())  # frozen: out of every generation a collection walks
    young = _Node()
    assert any(obj is young for obj in gc.get_objects())  # objects made later are tracked as before


@pytest.mark.parametrize("freeze", [True, False])
def test_server_start_freezes_its_heap_when_asked(tiny_llama_dir, tmp_path, monkeypatch, freeze):
    from server.api import state as state_module
    from tests.api.helpers import api_settings

    calls = []
    monkeypatch.setattr(state_module, "freeze_startup_heap", calls.append)
    state = state_module.ServerState(api_settings(tiny_llama_dir, tmp_path / "store", freeze_heap=freeze))
    state.start()
    try:
        assert calls == (["http process and engine thread"] if freeze else [])
        assert state.is_ready  # frozen before the server reports ready: no request meets the collection
    finally:
        state.stop()


def test_the_setting_is_on_unless_the_environment_turns_it_off(monkeypatch):
    from server.config import Settings

    monkeypatch.delenv("LORAPLEX_FREEZE_HEAP", raising=False)
    assert Settings().freeze_heap is True
    monkeypatch.setenv("LORAPLEX_FREEZE_HEAP", "0")
    assert Settings().freeze_heap is False


def test_an_engine_process_that_froze_its_heap_serves(tiny_llama_dir, tmp_path, monkeypatch):
    """The engine process freezes its own heap after loading (the spawned process reads freeze_heap from its
    settings); this process's freeze is stubbed (it is pytest's)."""
    from server.api import state as state_module
    from tests.api.helpers import BASE_ID, api_settings, live_server

    monkeypatch.setattr(state_module, "freeze_startup_heap", lambda where: 0)
    settings = api_settings(tiny_llama_dir, tmp_path / "store", engine_process=True, freeze_heap=True)
    with live_server(settings) as live, live.client() as client:
        body = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0}
        first = client.post("/v1/completions", json=body)
        again = client.post("/v1/completions", json=body)
    assert first.status_code == again.status_code == 200
    assert first.json()["usage"]["completion_tokens"] == 8
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
