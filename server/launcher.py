"""`python -m server --api-server-count N` (N > 1): one engine process, N API processes, one listening socket.

One API process streams ~12,000 tokens a second at 0.78-0.96 of a core on H200 hosts (1B, 32 streams): its
event loop wakes a task per stream per step, and uvicorn writes a chunk per token, all under one GIL, near
its ceiling on the slower hosts (bench/NOTES.md, twenty-sixth session; on a faster one, in the twenty-seventh,
two processes served the same tok/s as one). As vLLM's `--api-server-count` does, the launcher (this process)
splits the HTTP side over N processes:

- it binds one listening socket per API process, all on the same port with SO_REUSEPORT, starts the engine
  process (server.engine.core, one pair of ZeroMQ sockets per API process), then N API processes
  (server.serving.serve with an EngineAttachment), each accepting connections on its own socket. The
  kernel spreads new connections over the sockets by a hash of their addresses. One socket shared by all
  (uvicorn's multi-worker scheme) was tried first: uvloop accepts every pending connection at each wake-up,
  so one process took most of a burst of new connections (32 streams on the dev CPU: 2.05 against 0.29
  CPU seconds on the two event loops);
- SIGTERM / SIGINT: passed to every API process (each drains its streams and exits 0); a second signal is
  passed on too (each then skips its wait). Each API process tells the engine it is done as it stops; the
  engine exits after the last, and the launcher stops it if it has not within ENGINE_EXIT_S;
- an API process that exits unasked (a crash, a failed start): the others are stopped and the launcher
  exits non-zero, for the orchestrator to restart the whole server;
- the engine process dying: each API process reports not-ready and fails its requests in flight, as a
  lone API process does; the launcher keeps them up (their /health fails, so a liveness probe restarts it).

API processes run in a process group of their own, so that a terminal's Ctrl-C reaches them once, through
the launcher, and each exits soon after the launcher if the launcher is killed. A SIGTERM to every process
at once (systemd's KillMode=control-group) still drains: an API process takes a second signal within
DUPLICATE_SIGNAL_S of the first as the same one, and the engine process ignores SIGTERM.

Readiness is each API process's own: they get the engine's Ready together, but one may answer /ready a
few hundred milliseconds before another (tokenizer load, heap freeze), so a probe's 200 right at start-up
does not promise that every connection is served yet.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from server.config import Settings
from server.engine.core import run_engine_core
from server.engine.engine_handle import KILL_GRACE_S, EngineAttachment, SpawnedEngine, wait_while_parent
from server.model.loader import resolve_model_dir
from server.profiling import profiled
from server.serving import configure_logging, serve

log = logging.getLogger("loraplex.launcher")
ENGINE_EXIT_S = 10.0  # after the last API process: how long the engine has to exit on its own
PARENT_CHECK_S = 0.5


def serve_many(settings: Settings) -> int:
    """Run the engine process and `settings.api_server_count` API processes until a signal; the exit status."""
    count = settings.api_server_count
    try:
        port = _free_port(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    hf_dir, model_id = resolve_model_dir(settings.model, settings.cache_dir)  # a hub id: downloaded once, here
    model_id = settings.served_model_name or model_id
    listeners = [_bind(settings.host, port) for _ in range(count)]
    ipc_dir = tempfile.mkdtemp(prefix="loraplex-ipc-")
    endpoints = [(f"ipc://{ipc_dir}/input-{i}", f"ipc://{ipc_dir}/output-{i}") for i in range(count)]
    spawn = multiprocessing.get_context("spawn")
    engine = spawn.Process(target=run_engine_core, name="loraplex-engine",
                           args=(settings, str(hf_dir), model_id, endpoints, os.getpid(), True))
    engine.start()
    log.info("engine process %d started; starting %d API processes on %s:%d", engine.pid, count,
             settings.host, port)
    workers = [
        spawn.Process(target=_run_api_process, name=f"loraplex-api-{i}",
                      args=(settings, listeners[i], EngineAttachment(i, *endpoints[i], engine.pid, count), os.getpid()))
        for i in range(count)
    ]
    for worker in workers:
        worker.start()
    for listener in listeners:
        listener.close()  # the API processes hold them now
    supervisor = _Supervisor(workers, engine)
    previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # after an API process failed, no Shutdown comes from it; SIGTERM it ignores, so it ends killed then
        SpawnedEngine(engine).stop(ENGINE_EXIT_S if supervisor.status == 0 else KILL_GRACE_S)
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return status


class _Supervisor:
    """Waits for the API processes; passes signals on; stops the rest when one exits unasked."""

    def __init__(self, workers: list[multiprocessing.process.BaseProcess], engine: multiprocessing.process.BaseProcess):
        self.workers = workers
        self.engine = engine
        self.num_signals = 0
        self.status = 0

    def on_signal(self, sig: int, frame) -> None:
        self.num_signals += 1
        log.info("received %s: passing it to the API processes", signal.Signals(sig).name)
        self._signal_workers()

    def _signal_workers(self) -> None:
        for worker in self.workers:
            if worker.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def run(self) -> int:
        running = set(self.workers)
        engine_reported = False
        while running:
            waitables = [worker.sentinel for worker in running]
            if not engine_reported:
                waitables.append(self.engine.sentinel)
            multiprocessing.connection.wait(waitables, timeout=1.0)
            for worker in [w for w in running if w.exitcode is not None]:
                running.discard(worker)
                if self.num_signals == 0 or worker.exitcode != 0:
                    log.error("API process %s exited with code %s%s", worker.name, worker.exitcode,
                              "" if self.num_signals else " unasked: stopping the others")
                    self.status = 1
                    if self.num_signals == 0:
                        self.num_signals = 1
                        self._signal_workers()
            if not engine_reported and self.engine.exitcode is not None and running:
                engine_reported = True
                if self.num_signals == 0:
                    log.error("the engine process exited with code %s; the API processes report not ready",
                              self.engine.exitcode)
        return self.status


def _free_port(host: str, port: int) -> int:
    """`port` (or a free one for 0) after checking that nobody listens on it: SO_REUSEPORT would otherwise
    let the API processes share it silently with another server (a second launcher, an orphan)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))  # EADDRINUSE if anything, reuse-port sockets included, holds it
        return probe.getsockname()[1]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


def _run_api_process(settings: Settings, listener: socket.socket, attachment: EngineAttachment,
                     launcher_pid: int) -> None:
    """Entry point of one API process (a spawn target)."""
    os.setpgrp()
    configure_logging(settings.log_level)
    threading.Thread(target=_exit_with_launcher, args=(launcher_pid,), name="loraplex-launcher-watch",
                     daemon=True).start()
    with profiled(f"api{attachment.index}"):
        status = serve(settings, sockets=[listener], attachment=attachment)
    sys.exit(status)


def _exit_with_launcher(launcher_pid: int) -> None:
    """Drain and exit soon after the launcher is gone (killed; even before this process started): nobody
    would stop this process otherwise, and it would keep its share of the port."""
    wait_while_parent(launcher_pid, PARENT_CHECK_S)
    log.warning("the launcher is gone: this API process drains and exits")
    os.kill(os.getpid(), signal.SIGTERM)
