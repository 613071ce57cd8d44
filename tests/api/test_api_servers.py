"""`python -m server --api-server-count 2`: two API processes on one listening socket and one engine process
(server/launcher.py). The drain on SIGTERM is tested with the other modes in test_process.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import BASE_ID, child_pids, free_port, spawn_server, upload_files, wait_all_ready

ARGS = ["--served-model-name", BASE_ID, "--device", "cpu", "--quantization", "none", "--dtype", "float32",
        "--no-cuda-graphs", "--max-model-len", "512", "--kv-cache-blocks", "512", "--log-level", "info",
        "--api-server-count", "2"]


@pytest.fixture()
def servers(tiny_llama_dir, tmp_path):
    """The launcher process, its URL, its engine process and its two API processes."""
    port = free_port()
    roles: dict[str, list[int]] = {"api": [], "engine": []}
    process = spawn_server(["--model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "store"), *ARGS], port,
                           log_path=tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_all_ready(url, tmp_path / "server.log", 2, process)
        roles = _roles(process.pid)
        yield process, url, roles["api"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pid in roles["engine"] + roles["api"]:  # the launcher's children, looked up while it lived
            _kill(pid)


def _roles(launcher_pid: int) -> dict[str, list[int]]:
    """The launcher's spawned children: API processes lead their own process group, the engine does not."""
    roles: dict[str, list[int]] = {"api": [], "engine": []}
    for pid in child_pids(launcher_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                roles["api" if os.getpgid(pid) == pid else "engine"].append(pid)
        except (OSError, ProcessLookupError):
            continue
    return roles


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _stream_text(url: str, body: dict) -> str:
    with httpx.Client(base_url=url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1])


def _scrape(url: str, name: str) -> float:
    """One sample of /metrics on a fresh connection (either API process may answer)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_api_processes_serve_one_engine_and_every_metrics_scrape_counts_both(servers, tiny_adapters):
    process, url, api_pids = servers
    assert len(api_pids) == 2 and len(_roles(process.pid)["engine"]) == 1
    with httpx.Client(base_url=url, timeout=30) as client:
        assert upload_files(client, "shared", tiny_adapters["all-r8"]).status_code == 201
    body = {"model": BASE_ID, "prompt": "Hello there", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    texts: list[str] = []
    adapter_statuses: list[int] = []

    def client_thread():
        texts.append(_stream_text(url, body))
        # an upload answered by one API process is usable through the other at once (the store is on disk)
        response = httpx.post(f"{url}/v1/completions", json={**body, "model": "shared", "max_tokens": 2}, timeout=60)
        adapter_statuses.append(response.status_code)

    threads = [threading.Thread(target=client_thread) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert texts == [expected] * 12 and adapter_statuses == [200] * 12
    # 25 requests admitted in all, by two processes; every scrape (either process) counts every one of them
    # once the other's updates have come through the engine (relayed every 50 ms)
    name = "loraplex_http_admission_seconds_count"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {_scrape(url, name) for _ in range(6)} != {25.0}:
        time.sleep(0.1)
    assert {_scrape(url, name) for _ in range(8)} == {25.0}
    assert {_scrape(url, "vllm:generation_tokens_total") for _ in range(8)} == {24.0 * 13 + 2 * 12}


def test_engine_death_makes_both_api_processes_not_ready(servers):
    process, url, _ = servers
    (engine_pid,) = _roles(process.pid)["engine"]
    os.kill(engine_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and httpx.get(f"{url}/health", timeout=5).status_code == 200:
        time.sleep(0.05)
    for _ in range(6):  # fresh connections: whichever process answers
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and "engine process" in ready.json()["error"]["message"]
        refused = httpx.post(f"{url}/v1/completions", json={"model": BASE_ID, "prompt": "hi", "max_tokens": 2},
                             timeout=5)
        assert refused.status_code == 503
    process.send_signal(signal.SIGTERM)  # the API processes drain (nothing is in flight) and exit
    assert process.wait(30) == 0


def test_an_api_process_that_dies_stops_the_whole_server(servers):
    process, url, api_pids = servers
    os.kill(api_pids[0], signal.SIGKILL)
    assert process.wait(30) == 1
    time.sleep(0.5)
    assert not any(_is_running(pid) for pid in api_pids[1:])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_a_sigterm_to_every_process_at_once_still_drains(servers):
    """systemd's default stop signals every process of the unit: each API process gets SIGTERM twice (from
    systemd and from the launcher) and the engine once; the streams in flight still finish."""
    process, url, api_pids = servers
    (engine_pid,) = _roles(process.pid)["engine"]
    body = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    started = threading.Barrier(5)
    texts: list[str] = []

    def stream():
        with httpx.Client(base_url=url, timeout=60) as client, \
                client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            lines = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
            received = [next(lines)]
            started.wait(30)
            texts.append("".join([*received, *lines]))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    started.wait(30)
    for pid in (process.pid, *api_pids, engine_pid):
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert _is_running(engine_pid)  # the engine ignored it: it ends after the API processes' Shutdowns
    for thread in threads:
        thread.join(60)
    assert len(texts) == 4 and all(text.endswith("[DONE]") for text in texts)
    assert process.wait(30) == 0


def test_a_port_in_use_is_refused_not_shared(tiny_llama_dir, tmp_path):
    """SO_REUSEPORT would let the API processes join another server's port; the launcher checks first."""
    import socket

    with socket.socket() as taken:  # as another launcher's API process holds it
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = spawn_server(["--model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "store"), *ARGS],
                               port, log_path=tmp_path / "server.log")
        assert process.wait(60) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in (tmp_path / "server.log").read_text()
