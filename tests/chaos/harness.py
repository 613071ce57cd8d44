"""Chaos-suite helpers: `python -m server` processes, a /health and RSS probe, reference outputs, and
the checks every scenario ends with (engine alive, outputs right, memory back, nothing hung)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.api.helpers import BASE_ID, REPO_ROOT, free_port, spawn_server, upload, wait_ready

PROMPT = "Hello world"
NUM_TOKENS = 16  # greedy, ignore_eos: a fixed-length output that tells the adapters apart
HANG_BOUND_S = 30.0  # every request of a scenario must answer (or fail) within this
HEALTH_BOUND_S = 5.0  # the longest /health round trip tolerated during an attack: a stall detector, since
# CI shares 2 cores (load average 14 seen here); the figure itself goes into the run summary
RSS_GROWTH_BOUND_MIB = 300  # RSS after a storm may exceed RSS before it by at most this much
IDLE_BOUND_S = 10.0  # after a storm the engine must be empty (aborts reached it) within this


def server_args(model_dir: Path, adapters_dir: Path, **settings) -> list[str]:
    """CLI flags for a fast CPU server on the tiny Llama; `settings` are extra flags (max_cpu_adapters=1)."""
    args = ["--model", str(model_dir), "--served-model-name", BASE_ID, "--device", "cpu", "--quantization", "none",
            "--dtype", "float32", "--no-cuda-graphs", "--max-model-len", "512", "--kv-cache-blocks", "1024",
            "--adapters-dir", str(adapters_dir), "--max-rank", "16", "--max-upload-bytes", "2000000",
            "--log-level", "info"]
    for name, value in settings.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


@dataclass
class ServerProcess:
    """One `python -m server` on 127.0.0.1; its log is kept next to the test's tmp files."""

    process: object
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float:
        return _proc_status_kib(self.pid, "VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return _proc_status_kib(self.pid, "VmHWM") / 1024

    def client(self, timeout: float = HANG_BOUND_S) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


def start_server(model_dir: Path, adapters_dir: Path, log_path: Path, **settings) -> ServerProcess:
    port = free_port()
    process = spawn_server(server_args(model_dir, adapters_dir, **settings), port, log_path=log_path)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server.url, process=process)
    except Exception:
        process.kill()
        process.wait(10)
        raise
    return server


def _proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class HealthProbe:
    """Polls /health every `interval_s` from a separate process while a scenario runs: the longest round
    trip and any answer but 200 (connection errors after `expect_exit()` do not count)."""

    def __init__(self, server: ServerProcess, interval_s: float = 0.02):
        self.server, self.interval_s = server, interval_s
        self.latencies_s: list[float] = []
        self.failures: list[str] = []
        self._exit_expected_at = float("inf")
        self._process: subprocess.Popen | None = None

    def expect_exit(self) -> None:
        """The scenario is about to stop the server: refused connections from now on are expected."""
        self._exit_expected_at = time.monotonic()

    def __enter__(self) -> HealthProbe:
        self._output = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the probe
        self._process = subprocess.Popen([sys.executable, "-m", "tests.chaos.probe", self.server.url,
                                          str(self.interval_s)], cwd=REPO_ROOT, stdout=self._output)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """End the probe and read its results (idempotent)."""
        if self._process is None or self._process.returncode is not None:
            return
        self._process.terminate()
        self._process.wait(HANG_BOUND_S)
        self._output.seek(0)
        output, _ = self._output.read(), self._output.close()
        for line in output.splitlines():
            started, result, *rest = line.split(" ", 2)
            if result == "error":
                if float(started) < self._exit_expected_at:
                    self.failures.append(rest[0])
                continue
            self.latencies_s.append(float(result))
            if rest[0] != "200":
                self.failures.append(f"/health answered {rest[0]}")

    @property
    def max_latency_s(self) -> float:
        return max(self.latencies_s, default=0.0)


def completion_body(model: str, prompt: str = PROMPT, max_tokens: int = NUM_TOKENS, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}


def generate_alone(client: httpx.Client, model: str, prompt: str = PROMPT, max_tokens: int = NUM_TOKENS) -> str:
    """The greedy completion of one request with nothing else running: the reference outputs are compared to."""
    response = client.post("/v1/completions", json=completion_body(model, prompt, max_tokens))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def reference_outputs(client: httpx.Client, adapters: dict[str, Path], prompt: str = PROMPT,
                      max_tokens: int = NUM_TOKENS) -> dict[str, str]:
    """Upload each source adapter under `ref-<key>`, run the request alone on it: key -> text ('base' too).
    The texts must all differ, or a wrong-adapter output could pass unnoticed."""
    texts = {"base": generate_alone(client, BASE_ID, prompt, max_tokens)}
    for key, adapter_dir in adapters.items():
        upload(client, f"ref-{key}", adapter_dir)
        texts[key] = generate_alone(client, f"ref-{key}", prompt, max_tokens)
    assert len(set(texts.values())) == len(texts), f"reference outputs collide: {texts}"
    return texts


def wait_engine_idle(client: httpx.Client, timeout_s: float = IDLE_BOUND_S) -> None:
    """Every request has left the engine (running and waiting gauges at 0) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    gauges = {}
    while time.monotonic() < deadline:
        gauges = metric_values(client, ("vllm:num_requests_running", "vllm:num_requests_waiting"))
        if gauges and not any(gauges.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"engine still busy {timeout_s} s after the storm: {gauges}")


def metric_values(client: httpx.Client, names: tuple[str, ...], labels: str = "") -> dict[str, float]:
    """Sum of the samples of each metric name (optionally only lines containing `labels`)."""
    values = dict.fromkeys(names, 0.0)
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values and labels in line:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def assert_server_sound(server: ServerProcess, probe: HealthProbe, rss_before_mib: float,
                        expected: dict[str, str] | None = None) -> dict:
    """The end of every scenario: alive and ready, a normal request gives its reference output, RSS
    back within bounds, /health answered 200 within HEALTH_BOUND_S throughout. Returns the figures."""
    with server.client() as client:
        assert client.get("/health").status_code == 200, server.log_tail()
        assert client.get("/ready").status_code == 200, server.log_tail()
        wait_engine_idle(client)
        for model, text in (expected or {}).items():
            assert generate_alone(client, model) == text, f"{model} answers differently after the storm"
        if not expected:
            generate_alone(client, BASE_ID)
    probe.stop()
    rss_after = server.rss_mib()
    figures = {"rss_before_mib": round(rss_before_mib), "rss_after_mib": round(rss_after),
               "peak_rss_mib": round(server.peak_rss_mib()), "max_health_ms": round(probe.max_latency_s * 1000),
               "health_probes": len(probe.latencies_s)}
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log_tail()
    assert not probe.failures, probe.failures[:5]
    assert probe.latencies_s, "the /health probe never got an answer"
    assert probe.max_latency_s < HEALTH_BOUND_S, figures
    assert rss_after < rss_before_mib + RSS_GROWTH_BOUND_MIB, figures
    return figures


def expected_outputs(references: dict[str, str]) -> dict[str, str]:
    """Model name -> reference text for the `ref-*` adapters and the base model."""
    return {(BASE_ID if key == "base" else f"ref-{key}"): text for key, text in references.items()}


def stop(server: ServerProcess) -> None:
    """Kill a server left running by a failed scenario."""
    if server.process.poll() is None:
        server.process.kill()
        with contextlib.suppress(Exception):
            server.process.wait(10)
