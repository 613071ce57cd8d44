"""The engine process as the processes around it see it: spawned by an API process (`SpawnedEngine`), or by
server.launcher and reached by each of its API processes (`EngineAttachment`, `AttachedEngine`); and the
parent watch both the engine process and the launcher's API processes keep (`wait_while_parent`)."""

from __future__ import annotations

import multiprocessing
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class EngineAttachment:
    """How an API process started by server.launcher reaches the engine process the launcher started."""

    index: int  # this client's number among the engine's clients
    input_address: str  # bound by this client
    output_address: str
    engine_pid: int
    num_clients: int


class SpawnedEngine:
    """An engine process this process started (and stops)."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_message(self) -> str:
        return f"the engine process exited with code {self.process.exitcode}"

    def stop(self, timeout: float) -> None:
        """Give it `timeout` to exit on its own (after a Shutdown), then terminate it, then kill it."""
        self.process.join(timeout)
        self.kill()

    def close(self) -> None:
        pass

    def kill(self) -> None:
        process = self.process
        if not process.is_alive():
            return
        process.terminate()
        process.join(KILL_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join(KILL_GRACE_S)


class AttachedEngine:
    """An engine process our parent (server.launcher) started, or this process (tests): alive until its pidfd
    turns readable (it exited, even while not reaped yet). Whoever started it stops it."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            return
        if _parent_pid(pid) not in (os.getppid(), os.getpid()):  # reaped, its pid reused: not our engine
            self.close()

    def is_alive(self) -> bool:
        if self._pidfd is None:
            return False
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def exit_message(self) -> str:
        return f"the engine process (pid {self.pid}) exited"

    def stop(self, timeout: float) -> None:
        pass

    def kill(self) -> None:
        pass

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def wait_while_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Return once this process's parent is no longer `parent_pid` (it is gone: we were re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(interval_s)


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])
