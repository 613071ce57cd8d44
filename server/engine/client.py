"""The API process's side of the engine process: same interface as AsyncEngine, over ZeroMQ.

`start` spawns the engine process (spawn start method, so CUDA initialises cleanly in the child), binds
two ipc:// sockets in a private temp dir and waits for `Ready`. `generate` sends an `AddRequest` and
yields `RequestOutput`s; a receiver thread reads `Outputs`, applies their metric updates to this
process's registry, detokenizes each request's new tokens (stop strings are found here: the request is
then stopped in the engine) and hands the outputs to each request's event loop. If the engine process
dies, `is_alive` is false at once and every open stream raises EngineDeadError within IDLE_POLL_S.

With several API processes (server.launcher), the launcher starts the engine process and each API process's
client attaches to it (`EngineAttachment`): it binds its own pair of sockets, tags its requests with its
index, watches the engine process through a pidfd, and relays this process's own metric updates through
the engine to the other API processes (`relay`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from adapters_store import AdapterNotFoundError
from server import hop_trace
from server.config import Settings
from server.engine.async_engine import EngineDeadError, QueueFullError
from server.engine.core import run_engine_core
from server.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from server.engine.engine_handle import AttachedEngine, EngineAttachment, SpawnedEngine
from server.engine.metric_sink import DeltaSink, PrometheusSink
from server.engine.output_stream import OutputStream, put_all
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    Failed,
    Outputs,
    Ready,
    Rejected,
    RelayMetrics,
    Shutdown,
    TokenOutput,
    input_codec,
    output_codec,
)
from server.engine.request import FinishReason, Request, RequestOutput, SamplingError
from server.engine.stats import EngineMetrics

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.1  # the receiver checks the engine process at least this often
STARTUP_POLL_S = 0.1
RELAY_INTERVAL_S = 0.05  # how often this process's own metric updates go to the other API processes


class EngineStartError(RuntimeError):
    """The engine process failed to load or exited before it was ready."""


@dataclass
class _Stream:
    """One request in flight: where its outputs go and the detokenizer state of its output."""

    outputs: OutputStream
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    is_finished: bool = False


class EngineProcessClient:
    """Drives an engine process: `start`, `generate`, `abort`, `shutdown`, `is_alive` (as AsyncEngine)."""

    def __init__(self, settings: Settings, tokenizer, model_name: str, hf_dir: Path,
                 target: Callable[..., None] | None = None, attachment: EngineAttachment | None = None,
                 relay: DeltaSink | None = None):
        """`attachment`: reach an engine process started elsewhere instead of spawning one; `relay`: this
        process's metric updates to pass on to the other API processes (with an attachment)."""
        self.settings = settings
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.hf_dir = hf_dir
        # several API processes: each admits its share of the queue (the engine's queue is the sum)
        num_clients = 1 if attachment is None else attachment.num_clients
        self.max_queue_size = -(-settings.max_queue_size // num_clients)
        self.max_model_len = settings.max_model_len
        self.eos_token_ids: set[int] = set()
        self.num_slots = settings.max_slots
        self.fatal_error: str | None = None
        self._target = target or run_engine_core
        self._decoder = TokenDecoder(tokenizer)
        self._metrics = PrometheusSink()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe
        self._stopping = threading.Event()
        self._attachment = attachment
        self._index = 0 if attachment is None else attachment.index
        self._relay = relay
        self._engine: SpawnedEngine | AttachedEngine | None = None
        self._receiver: threading.Thread | None = None
        self._ipc_dir: str | None = None
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._output = self._context.socket(zmq.PULL)
        self._input_encoder, _ = input_codec()
        _, self._output_decoder = output_codec()

    @property
    def pid(self) -> int | None:
        return None if self._engine is None else self._engine.pid

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def is_alive(self) -> bool:
        """False once the engine process is gone; a death noticed here is reported at once (probes and
        new requests must not wait for the receiver's next poll to say why)."""
        if self._engine is None or self.fatal_error is not None:
            return False
        if not self._engine.is_alive():
            if not self._stopping.is_set():
                self._die(self._engine.exit_message())
            return False
        return True

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the engine process (or attach to it) and block until it is ready; raises EngineStartError."""
        if self._attachment is None:
            self._ipc_dir = tempfile.mkdtemp(prefix="loraplex-ipc-")
            input_address, output_address = (f"ipc://{self._ipc_dir}/{name}" for name in ("input", "output"))
        else:
            input_address, output_address = self._attachment.input_address, self._attachment.output_address
        self._input.setsockopt(zmq.LINGER, 0)
        self._output.setsockopt(zmq.LINGER, 0)
        self._input.bind(input_address)
        self._output.bind(output_address)
        if self._attachment is None:
            process = multiprocessing.get_context("spawn").Process(
                target=self._target, name="loraplex-engine",
                args=(self.settings, str(self.hf_dir), self.model_name, [(input_address, output_address)],
                      os.getpid()),
            )
            process.start()
            self._engine = SpawnedEngine(process)
            atexit.register(self._kill)
            log.info("engine process %d started; waiting for it to load the model", process.pid)
        else:
            self._engine = AttachedEngine(self._attachment.engine_pid)
            log.info("API process %d of %d: waiting for engine process %d", self._index + 1,
                     self._attachment.num_clients, self._engine.pid)
        try:
            ready = self._wait_ready()
        except BaseException:
            self._kill()
            self._close_sockets()
            raise
        self.max_model_len, self.eos_token_ids = ready.max_model_len, set(ready.eos_token_ids)
        self.num_slots = ready.num_slots
        engine_metrics = EngineMetrics(self.model_name, ready.num_slots)  # the engine's series, in this registry
        if ready.cache_config is not None:
            engine_metrics.record_config(*ready.cache_config)
        if ready.metrics is not None:
            self._metrics.apply(ready.metrics)
        self._receiver = threading.Thread(target=self._receive_loop, name="loraplex-engine-client", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> Ready:
        """Wait for Ready, then until the engine's end of our input socket is connected (POLLOUT: a PUSH can
        send): an attached engine connected before we bound, and ZeroMQ retries such a connect every
        100 ms, so Ready can arrive first and a request sent then would find no reader."""
        ready = None
        while True:
            if ready is None and self._output.poll(STARTUP_POLL_S * 1000):
                message = self._output_decoder.decode(self._output.recv())
                if isinstance(message, Ready):
                    ready = message
                elif isinstance(message, Failed):
                    raise EngineStartError(message.error)
            if ready is not None and self._input.poll(STARTUP_POLL_S * 1000, zmq.POLLOUT):
                return ready
            if not self._engine.is_alive():
                raise EngineStartError(f"{self._engine.exit_message()} while loading")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process (Shutdown, then terminate, then kill) and the receiver thread."""
        self._stopping.set()
        if self._engine is not None and self._engine.is_alive():
            if self._relay is not None:
                self._relay_metrics()  # the last updates, before this client leaves
            with contextlib.suppress(zmq.ZMQError), self._send_lock:
                self._input.send(self._input_encoder.encode(Shutdown(self._index)), zmq.NOBLOCK)
        if self._engine is not None:
            self._engine.stop(timeout)
        if self._receiver is not None:
            self._receiver.join(timeout)
        if self._engine is not None:
            self._engine.close()  # after the receiver, which polls it
        self._close_sockets()

    def _kill(self) -> None:
        if self._engine is not None:
            self._engine.kill()

    def _close_sockets(self) -> None:
        with self._send_lock:
            self._input.close()
        if self._receiver is None or not self._receiver.is_alive():
            self._output.close()
            self._context.term()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    # ---- requests -----------------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Send `request` and yield its outputs until it finishes. Refusals raise (SamplingError: 400;
        AdapterNotFoundError: 404); the engine process dying raises EngineDeadError."""
        if not self.is_alive():
            raise EngineDeadError(self.fatal_error or "the engine process is not running")
        if self.num_in_flight >= self.max_queue_size:
            raise QueueFullError(f"{self.num_in_flight} requests in flight; the queue holds {self.max_queue_size}")
        request_id = request.request_id
        stream = _Stream(OutputStream(asyncio.get_running_loop()),
                         IncrementalDetokenizer.for_params(self._decoder, request.params))
        with self._lock:
            self._streams[request_id] = stream
        finished = False
        try:
            if self.fatal_error is not None:  # died after the check above, before the stream was registered
                raise EngineDeadError(self.fatal_error)
            adapter = None if request.adapter is None else (request.adapter.name, request.adapter.version)
            self._send(AddRequest(request_id, request.prompt_token_ids, request.params, adapter,
                                  request.arrival_time, request.tenant, self._index))
            while True:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    finished = True  # refused or failed: the engine holds nothing for it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Stop a request in the engine (never blocks; a no-op once the engine is gone)."""
        with contextlib.suppress(EngineDeadError):
            self._send(AbortRequests([request_id], reason))

    def _send(self, message) -> None:
        frame = self._input_encoder.encode(message)
        try:
            with self._send_lock:
                self._input.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as err:  # Again: nobody reads the socket any more; or it is closed
            raise EngineDeadError(self.fatal_error or "the engine process is not reading requests") from err

    # ---- receiver thread ----------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        next_relay = time.monotonic() + RELAY_INTERVAL_S
        try:
            while not self._stopping.is_set():
                if self._output.poll(IDLE_POLL_S * 1000):
                    while True:
                        try:
                            frame = self._output.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        message = self._output_decoder.decode(frame)
                        if hop_trace.TRACE.enabled and isinstance(message, Outputs):
                            for output in message.outputs:
                                if output.completion_tokens == 1:
                                    hop_trace.TRACE.mark(output.request_id, "api_output_in")
                        self._handle(message)
                if self._relay is not None and time.monotonic() >= next_relay:
                    next_relay = time.monotonic() + RELAY_INTERVAL_S
                    self._relay_metrics()
                if self.fatal_error is None and not self._engine.is_alive() and not self._stopping.is_set():
                    self._die(self._engine.exit_message())
                if self.fatal_error is not None:
                    return
        except Exception as err:
            log.exception("engine client receiver failed")
            self._die(f"the engine client failed: {type(err).__name__}")

    def _relay_metrics(self) -> None:
        delta = self._relay.drain()
        if delta is not None:
            with contextlib.suppress(EngineDeadError):
                self._send(RelayMetrics(self._index, delta))

    def _handle(self, message) -> None:
        if isinstance(message, Failed):
            self._die(message.error)
            return
        if not isinstance(message, Outputs):
            return
        if message.metrics is not None:
            self._metrics.apply(message.metrics)  # before the outputs: a finished response sees its metrics
        items = [(rejected.request_id, _refusal(rejected)) for rejected in message.rejected]
        items += [item for output in message.outputs if (item := self._deliver(output)) is not None]
        self._put_many(items)

    def _deliver(self, output: TokenOutput) -> tuple[str, RequestOutput] | None:
        """Detokenize one output (finding stop strings); what its stream gets, or None if nobody waits."""
        with self._lock:
            stream = self._streams.get(output.request_id)
        if stream is None or stream.is_finished:
            return None
        reason = output.finish_reason
        text = ""
        if reason not in (FinishReason.ABORT, FinishReason.ERROR):
            stream.token_ids += output.new_token_ids
            text = stream.detokenizer.step(stream.token_ids, is_last=reason is not None,
                                           drop_last=output.ends_on_stop_token)
            if stream.detokenizer.is_stopped:
                if reason is None:
                    self.abort(output.request_id, FinishReason.STOP)
                reason = FinishReason.STOP
        stream.is_finished = reason is not None
        return output.request_id, RequestOutput(
            output.request_id, output.new_token_ids, text, output.new_logprobs, finished=reason is not None,
            finish_reason=reason, prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens, error=output.error,
            new_top_logprobs=output.new_top_logprobs, prompt_logprobs=output.prompt_logprobs,
        )

    def _put_many(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams with one call_soon_threadsafe per event loop (each call wakes the
        loop through its self-pipe: one wake-up per message, not per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, OutputStream, object]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.outputs.loop, []).append((request_id, stream.outputs, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, [(outputs, item) for _, outputs, item in batch])
            except RuntimeError:  # the consumer's event loop is closed: nobody will read these streams
                for request_id, _, item in batch:
                    with self._lock:
                        self._streams.pop(request_id, None)
                    if not (isinstance(item, RequestOutput) and item.finished):
                        self.abort(request_id)

    def _die(self, message: str) -> None:
        """The engine is gone: refuse new work and fail every open stream with EngineDeadError (once,
        whichever thread notices first)."""
        with self._lock:
            if self.fatal_error is not None:
                return
            self.fatal_error = message
            streams = list(self._streams)
        log.error("engine process failed: %s; failing %d requests in flight", message, len(streams))
        self._put_many([(request_id, EngineDeadError(f"{message}; the request was not completed"))
                        for request_id in streams])


def _refusal(rejected: Rejected) -> Exception:
    if rejected.kind == "sampling":
        return SamplingError(rejected.message)
    if rejected.kind == "adapter":
        return AdapterNotFoundError(rejected.message)
    return RuntimeError(rejected.message)

