"""Opt-in timestamps of each request's hops on its way to its first token, from every process of a host.

    LORAPLEX_HOP_TRACE=/tmp/hops python -m server ...   (the engine process and bench.serve's clients inherit it)
    python -m bench.hop_trace /tmp/hops                 (the hop-to-hop table)

The server's metrics give the engine's time to first token and the API's admission, but a client's time to
first token on the H200 (c32, 1B) was three times the engine's, and the difference had to be found hop by
hop: each process appends `<request id> <hop> <time.monotonic()>` lines to `<dir>/hops-<pid>.txt`.
CLOCK_MONOTONIC is one clock for every process of a host, so the lines join by request id (the response's
X-Request-Id, which is the engine's request id for one choice). Off (the default), a call site costs one
attribute test; on, a few lines a request and one test a token in the engine client's receiver.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ENV = "LORAPLEX_HOP_TRACE"

# In the order a request meets them; the processes that mark each (a hop may be missing, e.g. the engine
# process's own hops with the engine in a thread, or the client's with another client).
HOPS = (
    "client_sent",  # bench.serve's client, just before the request is built and sent
    "api_received",  # the app's first middleware (LifecycleMiddleware)
    "api_admitted",  # validated and handed to the engine client (Request.arrival_time)
    "engine_received",  # the engine took the request off its inbox (between steps)
    "engine_first_token",  # the first token read on the host (engine metrics' time to first token)
    "engine_sent",  # the engine process is sending the Outputs message with it
    "api_output_in",  # the engine client's receiver thread decoded that message
    "api_first_output",  # Generation.start has the first output (the handler goes on)
    "api_response_start",  # http.response.start passed to the server
    "api_first_body_sent",  # the first body chunk (the first SSE event) written
    "client_headers",  # the client has the response headers
    "client_first",  # the client has the first chunk with a choice
)


class HopTrace:
    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory else None
        self._file = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> HopTrace:
        return cls(os.environ.get(ENV))

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def mark(self, request_id: str, hop: str, at: float | None = None) -> None:
        """Record `hop` of `request_id` at `at` (time.monotonic(); now by default). A no-op when off."""
        if self.dir is None:
            return
        line = f"{request_id} {hop} {time.monotonic() if at is None else at:.6f}\n"
        with self._lock:
            if self._file is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._file = open(self.dir / f"hops-{os.getpid()}.txt", "a", buffering=1)  # noqa: SIM115
            self._file.write(line)


TRACE = HopTrace.from_env()
