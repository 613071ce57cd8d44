"""Backpressure and lifecycle: loading, queue full, timeouts, disconnects, engine errors."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server.metrics import REGISTRY
from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server, wait_idle, wait_ready

LONG = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def _slow_down(state, seconds_per_step: float) -> None:
    """Make every engine step take at least `seconds_per_step` so requests stay in flight."""
    engine = state.engine.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds_per_step)
        return step()

    engine.step = slow_step


def _aborted_count() -> float:
    value = REGISTRY.get_sample_value("vllm:request_success_total",
                                      {"model_name": BASE_ID, "finished_reason": "abort"})
    return value or 0.0


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), max_queue_size=2,
                            request_timeout_s=1.0)
    with live_server(settings) as live:
        _slow_down(live.state, 0.01)
        yield live


def test_queue_full_is_503_with_retry_after(server):
    with server.client() as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as first, \
                client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as second:
            assert first.status_code == second.status_code == 200
            refused = client.post("/v1/completions", json={**LONG, "max_tokens": 2})
            assert_error(refused, 503, "busy")
            assert int(refused.headers["retry-after"]) >= 1
        wait_idle(server.state)  # closing both streams aborted them
        assert client.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


def test_request_timeout_is_504_and_aborts(server):
    aborted = _aborted_count()
    with server.client() as client:
        started = time.monotonic()
        assert_error(client.post("/v1/completions", json=LONG), 504, "timed out", "request_timeout_s")
        assert time.monotonic() - started < 5
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(lines[-2][6:])["error"]["code"] == 504 and lines[-1] == "data: [DONE]"
    wait_idle(server.state)
    assert _aborted_count() >= aborted + 2


def test_client_disconnect_aborts_generation(server, monkeypatch):
    monkeypatch.setattr(server.state.settings, "request_timeout_s", 60.0)  # only a disconnect ends these
    aborted = _aborted_count()
    with server.client() as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            next(response.iter_lines())
        wait_idle(server.state, timeout_s=1.0)  # 200 slowed steps would take over 2 s
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=LONG, timeout=0.3)
        wait_idle(server.state, timeout_s=1.0)
    assert _aborted_count() >= aborted + 2


def test_engine_error_fails_only_that_request(server):
    runner = server.state.engine.engine.runner
    decode = runner.decode
    calls = {"n": 0}

    def failing_decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (secret detail)")
        return decode(*args, **kwargs)

    runner.decode = failing_decode
    try:
        with server.client() as client:
            response = client.post("/v1/completions", json={**LONG, "max_tokens": 4})
            error = assert_error(response, 500, "internal error")
            assert "secret" not in response.text and "CUDA" not in error["message"]
            assert client.post("/v1/completions", json={**LONG, "max_tokens": 4}).status_code == 200
            assert client.get("/health").status_code == 200
    finally:
        runner.decode = decode


def test_loading_phase_answers_probes(tiny_llama_dir, tmp_path):
    release = threading.Event()

    def hold_start(app):
        state = app.state.server
        start = state.start

        def blocked_start(loaded=None):
            from server.model.loader import load_phase

            with load_phase("probe"):
                release.wait(30)
            start(loaded)

        state.start = blocked_start

    settings = api_settings(tiny_llama_dir, tmp_path / "store")
    with live_server(settings, wait=False, before_start=hold_start) as live, live.client() as client:
        health = client.get("/health").json()
        assert health["status"] == "loading" and health["loading"]["phase"] == "probe", health
        assert health["loading"]["phase_s"] >= 0
        assert_error(client.get("/ready"), 503, "loading")
        assert_error(client.get("/v1/models"), 503, "loading")
        release.set()
        wait_ready(live.url, timeout_s=30)
        assert client.get("/v1/models").status_code == 200


def test_failed_start_is_unhealthy(tiny_llama_dir, tmp_path):
    def break_start(app):
        def failing_start(loaded=None):
            raise RuntimeError("weights are corrupt")

        app.state.server.start = failing_start

    settings = api_settings(tiny_llama_dir, tmp_path / "store")
    with live_server(settings, wait=False, before_start=break_start) as live, live.client() as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_error(client.get("/health"), 503, "weights are corrupt")
        assert_error(client.get("/ready"), 503, "failed to start")


def test_gil_switch_interval_setting_applies_at_start(tiny_llama_dir, tmp_path):
    import sys

    before = sys.getswitchinterval()
    settings = api_settings(tiny_llama_dir, tmp_path / "store", gil_switch_interval_ms=0.5)
    try:
        with live_server(settings) as live, live.client() as client:
            assert sys.getswitchinterval() == pytest.approx(0.0005)
            assert client.get("/ready").status_code == 200
    finally:
        sys.setswitchinterval(before)
