"""The engine in its own process (engine_process=True): what only that mode has to get right.

Disconnects and stop strings stop the request inside the engine process; the engine process dying
turns /health and /ready to 503 within a second and fails in-flight requests with a 503 instead of
hanging; a failed load is reported; an adapter version that vanished before the engine loaded it is
a 404. (The shared scenarios run in both modes: tests/api/test_openai_client.py, test_adapters_flow.py,
test_metrics.py, test_process.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server.api.auth import OPEN_PRINCIPAL
from server.api.errors import APIError
from server.api.generation import Generation
from server.api.state import ServerState
from server.engine.client import EngineStartError
from server.engine.request import AdapterRef, SamplingParams
from server.metrics import REGISTRY
from tests.api.helpers import (
    BASE_ID,
    REPO_ROOT,
    api_settings,
    assert_error,
    child_pids,
    failing_first_decode_engine_core,
    free_port,
    live_server,
    slow_engine_core,
)

LONG = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def _slow_engine(app) -> None:
    app.state.server.engine_core_target = slow_engine_core


def _count(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": BASE_ID, **labels}) or 0.0


def _wait_engine_idle(state, timeout_s: float) -> None:
    """No stream open here and nothing running or waiting in the engine (its gauges, sent each step)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = _count("vllm:num_requests_running") + _count("vllm:num_requests_waiting")
        if state.engine.num_in_flight == 0 and busy == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"{state.engine.num_in_flight} streams open, engine busy after the client left")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), engine_process=True)
    with live_server(settings, before_start=_slow_engine) as live:
        yield live


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {**LONG, "prompt": None, "messages": [{"role": "user", "content": "Hello"}]}),
], ids=["completions", "chat"])
def test_disconnect_aborts_the_request_in_the_engine_process(server, path, body, stream):
    body = {k: v for k, v in body.items() if v is not None}
    aborted = _count("vllm:request_success_total", finished_reason="abort")
    with httpx.Client(base_url=server.url) as client:
        if stream:
            with client.stream("POST", path, json={**body, "stream": True}) as response:
                assert response.status_code == 200
                next(response.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(path, json=body, timeout=httpx.Timeout(30, read=0.3))
    _wait_engine_idle(server.state, timeout_s=2.0)  # 200 slowed steps would take over 4 s
    assert _count("vllm:request_success_total", finished_reason="abort") == aborted + 1


def test_a_stop_string_found_by_the_api_process_stops_the_engine_request(server):
    with server.client() as client:
        free = client.post("/v1/completions", json={**LONG, "max_tokens": 16}).json()["choices"][0]["text"]
        stop = free[3:5]
        stopped = _count("vllm:request_success_total", finished_reason="stop")
        started = time.monotonic()
        response = client.post("/v1/completions", json={**LONG, "stop": [stop]})
        assert response.status_code == 200
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"] == free[: free.index(stop)]
        assert time.monotonic() - started < 3  # not the 200 slowed steps
    _wait_engine_idle(server.state, timeout_s=2.0)
    assert _count("vllm:request_success_total", finished_reason="stop") == stopped + 1


def test_the_stop_token_that_ends_a_request_leaves_no_text_across_the_processes(server):
    forced = {**LONG, "logit_bias": {"42": 100}, "stop_token_ids": [42], "max_tokens": 6}
    token_text = server.state.prompts.tokenizer.decode([42])
    with server.client() as client:
        for include, expected in ((False, ""), (True, token_text)):
            response = client.post("/v1/completions", json={**forced, "include_stop_str_in_output": include})
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["text"] == expected, include
            assert response.json()["usage"]["completion_tokens"] == 1


def test_an_adapter_version_gone_before_the_engine_loads_it_is_404(server):
    state = server.state
    prompt_ids = state.prompts.tokenizer.encode("Hello")

    async def start() -> None:
        await Generation.start(state, OPEN_PRINCIPAL, prompt_ids, SamplingParams(max_tokens=2),
                               AdapterRef("vanished", 3, None), "vanished-1")

    with pytest.raises(APIError) as info:
        asyncio.run(start())
    assert info.value.status_code == 404 and "vanished" in info.value.message
    assert state.engine.is_alive()


def test_engine_process_death_fails_in_flight_requests_and_probes(tiny_llama_dir, tmp_path):
    settings = api_settings(tiny_llama_dir, tmp_path / "store", engine_process=True)
    with live_server(settings, before_start=_slow_engine) as live, live.client() as client:
        results: dict[str, object] = {}
        in_flight = threading.Barrier(3)

        def stream() -> None:
            with live.client() as own, own.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data: "))
                first = next(lines)
                in_flight.wait(30)
                results["stream"] = [first, *lines]

        def plain() -> None:
            with live.client() as own:
                in_flight.wait(30)
                results["json"] = own.post("/v1/completions", json=LONG)

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for thread in threads:
            thread.start()
        in_flight.wait(30)
        time.sleep(0.2)  # the plain request is in the engine too
        os.kill(live.state.engine.pid, signal.SIGKILL)
        killed = time.monotonic()
        while client.get("/health").status_code == 200:
            time.sleep(0.01)
        assert time.monotonic() - killed < 1.0
        assert_error(client.get("/health"), 503, "engine process exited")
        assert_error(client.get("/ready"), 503, "engine process exited")
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive(), "an in-flight request hung after the engine process died"
        assert time.monotonic() - killed < 2.0
        assert_error(results["json"], 503, "engine process exited", "not completed")
        lines = results["stream"]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == 503 and "engine process exited" in error["message"]
        assert_error(client.post("/v1/completions", json={**LONG, "max_tokens": 2}), 503)


def test_an_engine_error_fails_only_that_request(tiny_llama_dir, tmp_path):
    def failing_engine(app) -> None:
        app.state.server.engine_core_target = failing_first_decode_engine_core

    settings = api_settings(tiny_llama_dir, tmp_path / "store", engine_process=True)
    with live_server(settings, before_start=failing_engine) as live, live.client() as client:
        response = client.post("/v1/completions", json={**LONG, "max_tokens": 4})
        error = assert_error(response, 500, "internal error")
        assert "secret" not in response.text and "CUDA" not in error["message"]
        assert client.post("/v1/completions", json={**LONG, "max_tokens": 4}).status_code == 200
        assert client.get("/health").status_code == 200 and live.state.engine.is_alive()


def test_a_failed_load_in_the_engine_process_is_reported(tiny_llama_dir, tmp_path):
    """The API process reads config and tokenizer; the engine process fails on the weights: start raises
    with the engine's reason (the app then reports it on /health and /ready, as for any failed start)."""
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    state = ServerState(api_settings(no_weights, tmp_path / "store", engine_process=True))
    with pytest.raises(EngineStartError, match=r"no \*\.safetensors weights"):
        state.start()
    state.stop()


# `python -m server --engine-process` whose engine process never finishes loading the model.
LOADING_FOREVER_SERVER = """
import sys
import server.engine.client
from tests.api.helpers import loading_forever_engine_core
server.engine.client.run_engine_core = loading_forever_engine_core
from server.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _pid_exists(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_while_the_engine_process_loads_ends_both_processes(tiny_llama_dir, tmp_path):
    """The API process exits at once (it skips its exit handlers); the engine process notices its parent
    is gone and exits too, though it is busy loading."""
    port = free_port()
    args = ["--port", str(port), "--model", str(tiny_llama_dir), "--device", "cpu", "--quantization", "none",
            "--adapters-dir", str(tmp_path / "a"), "--engine-process"]
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", LOADING_FOREVER_SERVER, *args], cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (engines := child_pids(process.pid)) or not _answers_loading(port):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while any(_pid_exists(pid) for pid in engines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_pid_exists(pid) for pid in engines), "the engine process outlived the API process"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers_loading(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["status"] == "loading"
    except httpx.HTTPError:
        return False
