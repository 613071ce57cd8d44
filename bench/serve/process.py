"""The server under test: `python -m server` as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerConfig:
    """The settings one server phase runs with (CLI flags of `python -m server`)."""

    model_dir: Path
    adapters_dir: Path
    device: str
    lora_mode: str = "unmerged"
    quantization: str = "nf4"
    max_slots: int = 32
    max_rank: int = 16
    max_batch_size: int = 64
    max_model_len: int = 2048
    max_num_batched_tokens: int = 4096
    max_queue_size: int = 4096
    max_cpu_adapters: int | None = None  # None: the server's byte budget (cpu_adapter_cache_bytes) alone
    served_model_name: str = "bench-base"
    auth_file: Path | None = None  # None = open mode
    extra_args: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        """The `python -m server` flags of this config."""
        flags = {
            "model": self.model_dir, "served-model-name": self.served_model_name, "device": self.device,
            "quantization": self.quantization, "lora-mode": self.lora_mode, "max-slots": self.max_slots,
            "max-rank": self.max_rank, "max-batch-size": self.max_batch_size, "max-model-len": self.max_model_len,
            "max-num-batched-tokens": self.max_num_batched_tokens, "max-queue-size": self.max_queue_size,
            "max-cpu-adapters": self.max_cpu_adapters, "adapters-dir": self.adapters_dir,
            "max-upload-bytes": 4 << 30, "request-timeout-s": 900, "log-level": "warning",
        }
        if self.auth_file is not None:
            flags["auth-file"] = self.auth_file
        args = [item for name, value in flags.items() if value is not None for item in (f"--{name}", str(value))]
        return args + list(self.extra_args)

    def as_dict(self) -> dict:
        return {"args": self.args()}


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Starts the server, waits for /ready, and stops it with SIGTERM (SIGKILL after a grace period)."""

    def __init__(self, config: ServerConfig, log_path: Path, name: str = "server"):
        self.config, self.log_path, self.name = config, log_path, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        """Start and wait until /ready answers 200; returns the seconds that took."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 *self.config.args()], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} before it was ready; "
                                   f"log tail:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):  # 8 in a row, new connections: every API process
                if all(httpx.get(f"{self.url}/ready", timeout=2).status_code == 200 for _ in range(8)):
                    return time.perf_counter() - started
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains, nothing is in flight), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
