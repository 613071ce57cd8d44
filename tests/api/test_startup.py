"""Start-up as a user watches it: each loading phase logged with its duration; SIGTERM while loading exits at once."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import httpx
import torch

from server.model.loader import load_hf_dir
from tests.api.helpers import REPO_ROOT, free_port

# `python -m server` whose model load never ends on its own (it sleeps in the loading thread).
SLOW_LOAD_SERVER = """
import sys, time
import server.api.state
server.api.state.load_model = lambda *args, **kwargs: time.sleep(300)
from server.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_each_loading_phase_is_logged_with_its_duration(tiny_llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="server.model.loader"):
        load_hf_dir(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32, quantize=True)
    done = [r.getMessage() for r in caplog.records if " done in " in r.getMessage()]
    assert [m.split()[1] for m in done] == ["read", "quantize", "tokenizer"], done
    assert all(m.endswith(" s") for m in done)


def test_sigterm_while_loading_exits_promptly(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_LOAD_SERVER, "--port", str(port), "--adapters-dir", str(tmp_path / "a")],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).json()["status"] == "loading":
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(f"{url}/ready", timeout=1).status_code == 503
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - sent < 5
        output = log_path.read_text()
        assert "stopped while loading the model" in output and "engine ready" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
