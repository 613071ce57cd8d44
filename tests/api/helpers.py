"""API test helpers: live uvicorn servers (in a thread or a subprocess) on the tiny random Llama."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn

from server.app import create_app
from server.config import Settings
from server.model.loader import load_hf_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_ID = "tiny-llama"
START_TIMEOUT_S = 60
ENGINE_MODES = {"thread": False, "process": True}  # the engine_process setting, by test id


def api_settings(model_dir: Path, adapters_dir: Path, **overrides) -> Settings:
    """Settings for a fast CPU server on the tiny model (float32, no NF4, short context)."""
    values = dict(
        model=str(model_dir), served_model_name=BASE_ID, device="cpu", quantization="none", dtype="float32",
        cuda_graphs=False, max_model_len=256, kv_cache_blocks=1024, adapters_dir=adapters_dir,
        max_rank=16, max_upload_bytes=200_000, request_timeout_s=60,
    )
    values.update(overrides)
    return Settings(**values)


@dataclass
class LiveServer:
    """A uvicorn server running create_app() in a background thread."""

    app: object
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self):
        return self.app.state.server

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_all_ready(url: str, log_path: Path, count: int, process: subprocess.Popen | None = None,
                   timeout_s: float = START_TIMEOUT_S) -> None:
    """Until `count` API processes of one server (`--api-server-count`) have each logged that they are
    ready: /ready answers for whichever process takes the connection."""
    wait_ready(url, timeout_s, process)
    deadline = time.monotonic() + timeout_s
    while log_path.read_text(errors="replace").count("INFO server.api.state: ready: model") < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} API processes not ready after {timeout_s} s")
        time.sleep(0.05)


def wait_ready(url: str, timeout_s: float = START_TIMEOUT_S, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def drop_other_model_series(keep: str) -> None:
    """Remove every metric series of a model other than `keep` from the in-process registry: earlier tests
    of this pytest process served other model names into it, and a real server has one model."""
    from server import metrics

    names = {values[collector._labelnames.index("model_name")]
             for collector in list(metrics.REGISTRY._collector_to_names)
             if "model_name" in getattr(collector, "_labelnames", ())
             for values in list(getattr(collector, "_metrics", {}))}
    for name in names - {keep}:
        metrics.remove_model_series(name)


@contextlib.contextmanager
def live_server(settings: Settings, wait: bool = True, before_start=None) -> Iterator[LiveServer]:
    """Serve create_app(settings) with a freshly loaded tiny model on 127.0.0.1 in a thread."""
    loaded = load_hf_dir(Path(settings.model), device=torch.device("cpu"), dtype=torch.float32,
                         quantize=settings.quantization == "nf4")
    app = create_app(settings, loaded=loaded)
    if before_start is not None:
        before_start(app)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(app, f"http://127.0.0.1:{port}", server, thread)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        if wait:
            wait_ready(live.url)
        yield live
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def upload_files(client: httpx.Client, name: str, adapter_dir: Path) -> httpx.Response:
    files = {
        "adapter_config.json": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
        "adapter_model.safetensors": (
            "adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()
        ),
    }
    return client.put(f"/v1/adapters/{name}", files=files)


def upload(client: httpx.Client, name: str, adapter_dir: Path) -> dict:
    response = upload_files(client, name, adapter_dir)
    assert response.status_code == 201, response.text
    return response.json()


def complete(client: httpx.Client, model: str, prompt: str = "Hello world", max_tokens: int = 12,
             **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def greedy_text(client: httpx.Client, model: str, **kwargs) -> str:
    response = complete(client, model, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_error(response: httpx.Response, status: int, *needles: str) -> dict:
    """The response is an OpenAI-shaped error with `status` whose message names every needle."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == status
    assert isinstance(error["type"], str) and error["type"].endswith("Error")
    message = error["message"]
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    assert "Traceback" not in message
    return error


def spawn_server(args: list[str], port: int, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> subprocess.Popen:
    """`python -m server` as a subprocess on 127.0.0.1:port."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    return subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
    )


# Metric family (as prometheus_client's parser names it: counters without _total) -> the labels
# DESIGN.md requires on it.
DESIGN_FAMILIES = {
    "vllm:num_requests_running": {"model_name"},
    "vllm:num_requests_waiting": {"model_name"},
    "vllm:kv_cache_usage_perc": {"model_name"},
    "vllm:lora_requests_info": {"model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"},
    "vllm:time_to_first_token_seconds": {"model_name"},
    "vllm:inter_token_latency_seconds": {"model_name"},
    "vllm:e2e_request_latency_seconds": {"model_name"},
    "vllm:request_queue_time_seconds": {"model_name"},
    "vllm:prompt_tokens": {"model_name"},
    "vllm:generation_tokens": {"model_name"},
    "vllm:request_success": {"model_name", "finished_reason"},
    "loraplex_adapter_requests": {"adapter", "status"},
    "loraplex_adapter_load_seconds": set(),
    "loraplex_adapters_resident": {"tier"},
    "loraplex_adapter_swaps": {"mode"},
    "loraplex_batch_distinct_adapters": set(),
}


def slow_engine_core(*args) -> None:
    """Engine process entry (a spawn target) whose steps take at least 20 ms, so requests stay in flight."""
    from server.engine.core import run_engine_core
    from server.engine.engine import LLMEngine

    step = LLMEngine.step

    def slow_step(self):
        time.sleep(0.02)
        return step(self)

    LLMEngine.step = slow_step
    run_engine_core(*args)


def loading_forever_engine_core(*args) -> None:
    """Engine process entry (a spawn target) whose model load never ends on its own."""
    from server.engine import core

    def sleep_forever(*_args, **_kwargs):
        time.sleep(3600)

    core.EngineCore.build = sleep_forever
    core.run_engine_core(*args)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def failing_first_decode_engine_core(*args) -> None:
    """Engine process entry (a spawn target) whose first decode step raises, as a CUDA OOM would."""
    from server.engine.core import run_engine_core
    from server.engine.runner import ModelRunner

    decode = ModelRunner.decode
    calls = {"n": 0}

    def failing_decode(self, *decode_args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (secret detail)")
        return decode(self, *decode_args, **kwargs)

    ModelRunner.decode = failing_decode
    run_engine_core(*args)


def closed_schema(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever it lists properties (kubectl's strict field validation);
    an object without listed properties (metadata) or marked x-kubernetes-preserve-unknown-fields stays open."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def wait_idle(state, timeout_s: float = 5.0) -> None:
    """Wait until the server's engine holds no request (after clients left or finished)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state.engine.num_in_flight == 0 and not state.engine.engine.has_unfinished():
            return
        time.sleep(0.01)
    raise AssertionError(f"{state.engine.num_in_flight} requests still in flight after {timeout_s} s")
