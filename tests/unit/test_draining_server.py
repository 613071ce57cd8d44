"""DrainingServer's signals: the first starts the drain, a later one skips its wait; server.launcher's API
processes take a repeat within DUPLICATE_SIGNAL_S as the same signal (a group-wide SIGTERM plus the one the
launcher passes on)."""

from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace

import uvicorn

from server.api.state import Phase
from server.serving import DUPLICATE_SIGNAL_S, DrainingServer


def _server(repeat_within_s: float) -> tuple[DrainingServer, asyncio.AbstractEventLoop]:
    state = SimpleNamespace(phase=Phase.READY, num_active_requests=0)
    server = DrainingServer(uvicorn.Config(app=None), state, drain_timeout_s=1.0, repeat_within_s=repeat_within_s)
    loop = asyncio.new_event_loop()
    server._loop = loop
    return server, loop


def test_a_second_signal_skips_the_drain():
    server, loop = _server(0.0)
    try:
        server.handle_exit(signal.SIGTERM, None)
        assert server._is_draining and not server.should_exit
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
    finally:
        loop.close()


def test_an_api_process_takes_a_prompt_repeat_as_the_same_signal(monkeypatch):
    server, loop = _server(DUPLICATE_SIGNAL_S)
    try:
        server.handle_exit(signal.SIGTERM, None)
        server.handle_exit(signal.SIGTERM, None)  # the same SIGTERM, delivered twice
        assert server._is_draining and not server.should_exit
        later = time.monotonic() + DUPLICATE_SIGNAL_S + 0.1
        monkeypatch.setattr(time, "monotonic", lambda: later)
        server.handle_exit(signal.SIGINT, None)  # an operator's second signal, later: skip the wait
        assert server.should_exit
    finally:
        loop.close()
