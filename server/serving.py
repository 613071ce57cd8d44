"""Serve the app with uvicorn in this process: `serve` (what `python -m server` runs, and each API process of
`--api-server-count N`, server/launcher.py). SIGTERM drains before exiting 0.

A signal while the model is still loading ends the process at once (nothing is in flight yet).
Otherwise a first SIGTERM or SIGINT starts a drain: /ready turns 503, new requests get 503, requests in
flight run to completion (bounded by request_timeout_s), then uvicorn shuts down. A second signal
skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import uvicorn

from server import keys_cli
from server.api.auth import KeyFileError
from server.api.state import Phase, ServerState
from server.app import create_app
from server.config import Settings
from server.engine.engine_handle import EngineAttachment

log = logging.getLogger("loraplex")
SHUTDOWN_GRACE_S = 5.0
DUPLICATE_SIGNAL_S = 1.0  # server.launcher's API processes: a repeat this soon is the same signal


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the app before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float,
                 repeat_within_s: float = 0.0):
        """`repeat_within_s`: a signal that soon after the one that started the drain is the same signal sent
        twice (server.launcher's API processes: once by the launcher, once by a group-wide kill), not a
        request to skip the wait."""
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.repeat_within_s = repeat_within_s
        self._drain_signalled_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future | None = None
        self._is_draining = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    async def serve(self, sockets=None) -> None:
        status = 0
        try:
            await super().serve(sockets)
        except SystemExit as exc:  # uvicorn's start-up failure, e.g. the port is taken
            status = exc.code if isinstance(exc.code, int) else 1
            raise
        finally:
            if self.state.engine is None and self.state.phase is not Phase.FAILED:
                # Stopped while the model loads in a worker thread that cannot be interrupted; returning
                # would wait for it (asyncio joins its executor), so a pod would outlive its grace period.
                log.info("stopped while loading the model: exiting without waiting for the load to finish")
                logging.shutdown()
                os._exit(status)

    def handle_exit(self, sig: int, frame) -> None:
        # Not calling super(): it would re-raise the signal after shutdown and end with a non-zero status.
        if self._is_draining and time.monotonic() - self._drain_signalled_at < self.repeat_within_s:
            return
        if self._loop is None or self._is_draining or self.state.phase is not Phase.READY:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        self._is_draining = True
        self._drain_signalled_at = time.monotonic()
        log.info("received %s: draining (%d requests in flight)", signal.Signals(sig).name,
                 self.state.num_active_requests)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    def request_exit(self) -> None:
        self.should_exit = True

    async def _drain(self) -> None:
        await self.state.drain(self.drain_timeout_s)
        self.should_exit = True


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(settings: Settings, sockets: list | None = None, attachment: EngineAttachment | None = None) -> int:
    """Run the server until a signal; returns the process exit status. `sockets`: listen on these instead of
    binding host:port; `attachment`: one of several API processes (server.launcher)."""
    if settings.auth_file is None:
        log.warning("OPEN MODE: no auth file (LORAPLEX_AUTH_FILE), so every caller may generate and manage "
                    "adapters; listening on %s only. Set an auth file to serve other hosts.", settings.host)
    try:
        app = create_app(settings, attachment=attachment)
        if settings.auth_file is not None:
            num_keys, num_tenants = keys_cli.summarize(settings.auth_file)
            log.info("auth: %d keys for %d tenants loaded from %s", num_keys, num_tenants, settings.auth_file)
    except KeyFileError as exc:
        log.error("%s", exc)
        return 2
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, access_log=settings.log_level == "debug",
        log_config=None,  # keep configure_logging's format for uvicorn's loggers too
    )
    server = DrainingServer(config, state, drain_timeout_s=settings.request_timeout_s,
                            repeat_within_s=0.0 if attachment is None else DUPLICATE_SIGNAL_S)
    # The signal handler runs on the event loop's thread; the engine thread never touches these.
    app.state.on_startup_failure = server.request_exit
    server.run(sockets=sockets)
    return 1 if state.phase is Phase.FAILED else 0
