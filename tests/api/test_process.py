"""`python -m server` as a real process: SIGTERM drains, kill -9 during uploads loses nothing."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import (
    BASE_ID,
    ENGINE_MODES,
    free_port,
    spawn_server,
    upload,
    upload_files,
    wait_all_ready,
    wait_ready,
)


def _server_args(model_dir: Path, adapters_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--served-model-name", BASE_ID, "--device", "cpu",
            "--quantization", "none", "--dtype", "float32", "--no-cuda-graphs", "--max-model-len", "512",
            "--kv-cache-blocks", "512", "--adapters-dir", str(adapters_dir), "--log-level", "info"]


@pytest.fixture()
def process_server(tiny_llama_dir, tmp_path):
    """Start a server process; the test signals it; whatever is left is killed at the end."""
    started = []

    def start(adapters_dir: Path, extra_args: tuple[str, ...] = ()):
        port = free_port()
        log_path = tmp_path / f"server-{len(started)}.log"
        process = spawn_server([*_server_args(tiny_llama_dir, adapters_dir), *extra_args], port, log_path=log_path)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        if "--api-server-count" in extra_args:
            wait_all_ready(url, log_path, int(extra_args[extra_args.index("--api-server-count") + 1]), process)
        else:
            wait_ready(url, process=process)
        return process, url

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize("engine_args", [(), ("--engine-process",), ("--api-server-count", "2")],
                         ids=[*ENGINE_MODES, "api2"])
def test_sigterm_drains_in_flight_streams_then_exits_0(process_server, tmp_path, engine_args):
    process, url = process_server(tmp_path / "store", engine_args)
    body = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "temperature": 0,
            "stream": True}
    results: list[list[str]] = []
    first_chunk = threading.Barrier(5)

    def stream():
        with httpx.Client(base_url=url, timeout=60) as client, \
                client.stream("POST", "/v1/completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            received = [next(lines)]
            first_chunk.wait(30)
            results.append(received + list(lines))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    first_chunk.wait(30)
    process.send_signal(signal.SIGTERM)
    with httpx.Client(base_url=url, timeout=10) as client:
        deadline = time.monotonic() + 5
        while client.get("/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        ready = client.get("/ready")
        refused = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        alive = client.get("/health").status_code
    assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert alive == 200
    assert any(thread.is_alive() for thread in threads), "streams should still be running during the drain"
    for thread in threads:
        thread.join(60)
    assert process.wait(30) == 0
    assert len(results) == 4
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        assert sum(len(json.loads(line[6:])["choices"]) for line in lines[:-1]) == len(lines) - 1
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_kill_9_during_uploads_leaves_nothing_partial(process_server, tiny_adapters, tmp_path):
    store = tmp_path / "store"
    process, url = process_server(store)
    acknowledged: dict[str, int] = {}  # name -> highest version the server answered 201 for
    lock = threading.Lock()
    stop = threading.Event()

    def upload_loop():
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                source = tiny_adapters["ko-r16" if i % 2 else "all-r8"]
                try:
                    response = upload_files(client, f"crash-{i % 5}", source)
                except httpx.HTTPError:
                    return
                if response.status_code == 201:
                    record = response.json()
                    with lock:
                        acknowledged[record["name"]] = max(acknowledged.get(record["name"], 0), record["version"])

    def trickle():
        """A slow chunked upload that is still incomplete when the process dies."""
        def body():
            yield b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n\r\n"
            while not stop.is_set():
                time.sleep(0.05)
                yield b"\0" * 1024

        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                client.put("/v1/adapters/partial", content=body(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
        except httpx.HTTPError:
            pass

    workers = [threading.Thread(target=upload_loop), threading.Thread(target=upload_loop),
               threading.Thread(target=trickle)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 20
    while sum(acknowledged.values()) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait(10)
    stop.set()
    for worker in workers:
        worker.join(10)
    assert sum(acknowledged.values()) >= 8
    valid_sha256 = {hashlib.sha256((tiny_adapters[n] / "adapter_model.safetensors").read_bytes()).hexdigest()
                    for n in ("ko-r16", "all-r8")}

    _, url = process_server(store)
    with httpx.Client(base_url=url, timeout=30) as client:
        listed = client.get("/v1/adapters").json()["data"]
        assert {a["name"] for a in listed} >= set(acknowledged)
        assert {a["name"] for a in listed} <= {f"crash-{i}" for i in range(5)}
        for adapter in listed:
            assert adapter["sha256"] in valid_sha256
            assert adapter["version"] >= acknowledged.get(adapter["name"], 0)  # acknowledged = durable
            response = client.post("/v1/completions", json={"model": adapter["name"], "prompt": "Hi",
                                                            "max_tokens": 2})
            assert response.status_code == 200, response.text
        assert client.get("/v1/adapters/partial").status_code == 404
        assert upload(client, "after-restart", tiny_adapters["attn-r4"])["version"] == 1
    assert not list((store / ".staging").iterdir())
    for adapter_dir in store.glob("crash-*"):
        for version_dir in adapter_dir.iterdir():
            assert (version_dir / "manifest.json").is_file(), f"{version_dir} has no manifest"
