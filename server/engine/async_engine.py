"""Drive the engine from one background thread; give each request an async stream of outputs.

The HTTP layer only queues work and awaits results: `generate()` puts a request on a thread-safe
inbox and yields `RequestOutput`s as the engine thread produces them. If the consumer goes away
(client disconnect, timeout), the request is aborted inside the engine at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator

from server import hop_trace
from server.engine.engine import LLMEngine
from server.engine.guard import abort_or_fail, run_step
from server.engine.output_stream import OutputStream, put_all
from server.engine.request import FinishReason, Request, RequestOutput

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served (HTTP 503)."""


class AsyncEngine:
    """Thread-driven wrapper: `generate`, `abort`, `start`, `shutdown`, `is_alive`."""

    def __init__(self, engine: LLMEngine, max_queue_size: int = 256):
        self.engine = engine
        self.max_queue_size = max_queue_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.fatal_error: str | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token_ids(self) -> set[int]:
        return self.engine.eos_token_ids

    @property
    def num_slots(self) -> int:
        return self.engine.num_slots

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal_error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue `request` and yield its outputs until it finishes. Validation errors raise at once."""
        if not self.is_alive():
            raise EngineDeadError("the engine loop is not running")
        if self.num_in_flight >= self.max_queue_size:
            raise QueueFullError(f"{self.num_in_flight} requests in flight; the queue holds {self.max_queue_size}")
        loop = asyncio.get_running_loop()
        stream = OutputStream(loop)
        added: asyncio.Future = loop.create_future()
        with self._lock:
            self._streams[request.request_id] = stream
        self._inbox.put(("add", request, (loop, added)))
        self._wakeup.set()
        finished = False
        try:
            await added  # raises the engine's validation error, if any
            while True:
                output = await stream.get()
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wakeup.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Serve until shutdown. An exception while handling one request fails that request; one inside
        a step fails that step's requests; only a failure of that recovery itself ends the loop, and
        then every open stream gets an error instead of hanging."""
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                self._dispatch(run_step(self.engine))
        except BaseException as err:
            self.fatal_error = repr(err)
            log.exception("engine loop died")
            self._fail_open_streams(f"the engine stopped: {type(err).__name__}")
            raise

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, extra = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(item, *extra)
            else:
                self._abort(item)

    def _add(self, request: Request, loop: asyncio.AbstractEventLoop, added: asyncio.Future) -> None:
        hop_trace.TRACE.mark(request.request_id, "engine_received")
        try:
            self.engine.add_request(request)
        except Exception as err:
            with self._lock:
                self._streams.pop(request.request_id, None)
            _call_soon(loop, _set_exception, added, err)
        else:
            _call_soon(loop, _set_result, added)

    def _abort(self, request_id: str) -> None:
        self._dispatch(abort_or_fail(self.engine, request_id))

    def _fail_open_streams(self, message: str) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        for request_id, stream in streams:
            output = RequestOutput(request_id, [], "", None, finished=True, finish_reason=FinishReason.ERROR,
                                   error=message)
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.put, output)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one call_soon_threadsafe per event loop, not per output
        (each call wakes the loop through its self-pipe: 32 wake-ups a step at batch 32)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, RequestOutput]]] = {}
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read these streams
                for _, output in items:
                    with self._lock:
                        self._streams.pop(output.request_id, None)
                    if not output.finished:
                        self._inbox.put(("abort", output.request_id, None))


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Schedule fn on the consumer's loop; a closed loop means the consumer is gone (its request is
    then aborted when its stream is next written)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)

