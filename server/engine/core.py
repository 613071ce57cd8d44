"""The engine core in its own process (vLLM V1 style): schedule, run the model, sample; token ids out.

`run_engine_core` is the spawn target. It loads the model and builds the engine itself, reports `Ready`,
then serves `AddRequest` / `AbortRequests` from the API process and sends one `Outputs` message per step
(token ids, finishes, and the step's metric updates). Adapter weights are read here from the shared
adapter store by the (name, version) the API process resolved, on a loader thread, so a cold adapter
never stalls the running batch. The process ends on `Shutdown` (from every client), when its parent
process is gone, or (after sending `Failed`) when the loop itself fails.

It serves one client (the API process that spawned it) or several (`api_server_count`, started by
server.launcher): one input socket read for all, one output socket each; a step's outputs are split by
the client each request came from (`EngineCore.route`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zmq

from adapters_store import AdapterNotFoundError, AdapterStore, BaseModelSpec
from server import hop_trace
from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.engine_handle import wait_while_parent
from server.engine.guard import abort_or_fail, run_step
from server.engine.metric_sink import DeltaSink
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineInput,
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
from server.engine.request import AdapterRef, Request, RequestOutput, SamplingError
from server.heap import freeze_startup_heap
from server.model.loader import load_hf_dir, resolve_device, resolve_dtype
from server.profiling import profiled
from server.registry import AdapterRegistry, pin_memory_available

log = logging.getLogger(__name__)
IDLE_POLL_MS = 100  # how long an idle engine waits for input
PARENT_CHECK_S = 0.5  # how often the engine process checks that the API process still exists
LOADING_POLL_MS = 2  # while adapter weights are loading: how soon a finished load is picked up
SEND_LINGER_MS = 2000  # time given to the last messages (Failed) to leave when the process ends
ADAPTER_LOAD_THREADS = 2


class EngineCore:
    """The engine plus what the process boundary adds: adapter loading by version and output messages."""

    def __init__(self, engine: LLMEngine, store: AdapterStore, registry: AdapterRegistry, sink: DeltaSink):
        self.engine = engine
        self.store = store
        self.registry = registry
        self.sink = sink
        self._pending: dict[str, AddRequest] = {}  # waiting for their adapter's weights
        self._loaded: queue.SimpleQueue[tuple[AddRequest, Future]] = queue.SimpleQueue()
        self._loader = ThreadPoolExecutor(ADAPTER_LOAD_THREADS, thread_name_prefix="loraplex-adapter-load")
        self._rejected: list[Rejected] = []
        self._outputs: list[RequestOutput] = []  # produced outside a step (aborts)
        self._clients: dict[str, int] = {}  # request id -> the client it came from, until it finishes

    @classmethod
    def build(cls, settings: Settings, hf_dir: Path, model_id: str) -> EngineCore:
        device = resolve_device(settings.device)
        loaded = load_hf_dir(hf_dir, device=device, dtype=resolve_dtype(settings.dtype, device),
                             quantize=settings.quantization == "nf4", model_id=model_id)
        store = AdapterStore(settings.adapters_dir, BaseModelSpec.from_hf_config(loaded.config.hf_config),
                             settings.max_rank, settings.max_upload_bytes,
                             versions_kept=settings.adapter_versions_kept)
        sink = DeltaSink()

        def on_load(seconds: float, num_cached: int) -> None:  # the CPU tier lives in this process
            sink.observe("adapter_load_seconds", (model_id, "cpu"), seconds)
            sink.set("adapters_resident", (model_id, "cpu"), num_cached)
            sink.inc("adapter_loads", (model_id, "cpu"))
            sink.set("adapter_bytes_resident", (model_id, "cpu"), registry.nbytes)

        def on_evict(num_evicted: int) -> None:
            sink.inc("adapter_evictions", (model_id, "cpu"), num_evicted)

        registry = AdapterRegistry(store, settings.max_cpu_adapters, pin_memory_available(), on_load=on_load,
                                   max_bytes=settings.cpu_adapter_cache_bytes, on_evict=on_evict)
        engine = LLMEngine(loaded, settings, detokenize=False, metrics_sink=sink)
        engine.metrics.record_step([], [], 0.0, None)
        return cls(engine, store, registry, sink)

    def ready_message(self) -> Ready:
        return Ready(self.engine.max_model_len, sorted(self.engine.eos_token_ids), self.engine.num_slots,
                     self.engine.metrics.config, self.sink.drain())

    # ---- inputs -------------------------------------------------------------------------------------

    def handle(self, message: AddRequest | AbortRequests) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        else:
            self._abort(message)

    def _add(self, message: AddRequest) -> None:
        if message.client:
            self._clients[message.request_id] = message.client
        if message.adapter is None:
            self._admit(message, None)
            return
        weights = self.registry.cached(*message.adapter)
        if weights is not None:
            self._admit(message, AdapterRef(*message.adapter, weights))
            return
        self._pending[message.request_id] = message
        future = self._loader.submit(self.load_adapter, *message.adapter)
        future.add_done_callback(lambda done, m=message: self._loaded.put((m, done)))

    def load_adapter(self, name: str, version: int) -> AdapterRef:
        """The adapter at the version the API process resolved, or at the latest if that one was pruned since
        (more uploads than adapter_versions_kept in between), as AdapterRegistry.resolve does in one process:
        the request has not started, so no running request changes version. Raises AdapterNotFoundError once
        the adapter is gone."""
        try:
            record = self.store.get(name, version)
        except AdapterNotFoundError:
            record = self.store.get(name)
        return AdapterRef(record.name, record.version, self.registry.weights(record))

    def _admit(self, message: AddRequest, adapter: AdapterRef | None) -> None:
        request = Request(message.prompt_token_ids, message.params, adapter, request_id=message.request_id,
                          arrival_time=message.arrival_time, tenant=message.tenant)
        try:
            self.engine.add_request(request)
        except SamplingError as err:
            self._rejected.append(Rejected(message.request_id, "sampling", str(err)))

    def take_loaded(self) -> None:
        """Admit the requests whose adapter weights finished loading (skipping those aborted meanwhile)."""
        while True:
            try:
                message, future = self._loaded.get_nowait()
            except queue.Empty:
                return
            if self._pending.pop(message.request_id, None) is None:
                continue
            try:
                adapter = future.result()
            except AdapterNotFoundError as err:
                self._rejected.append(Rejected(message.request_id, "adapter", str(err)))
            except Exception as err:
                log.exception("loading adapter %s v%d failed", *message.adapter)
                self._rejected.append(Rejected(message.request_id, "error", f"{type(err).__name__} while "
                                               "loading the adapter"))
            else:
                self._admit(message, adapter)

    def _abort(self, message: AbortRequests) -> None:
        for request_id in message.request_ids:
            if self._pending.pop(request_id, None) is not None:
                self._clients.pop(request_id, None)
                continue  # never reached the engine: nothing to free or count
            outputs = abort_or_fail(self.engine, request_id, message.reason)
            if not any(o.request_id == request_id and o.finished for o in outputs):
                self._clients.pop(request_id, None)  # no last output will carry its route away
            self._outputs += outputs

    @property
    def is_loading(self) -> bool:
        return bool(self._pending)

    # ---- outputs ------------------------------------------------------------------------------------

    def step(self) -> Outputs | None:
        """Run one step if there is work; the message for everything produced since the last one."""
        outputs, self._outputs = self._outputs, []
        if self.engine.has_unfinished():
            outputs += run_step(self.engine)
        rejected, self._rejected = self._rejected, []
        delta = self.sink.drain()
        if not (outputs or rejected or delta):
            return None
        return Outputs([_token_output(o) for o in outputs], rejected, delta)

    def route(self, message: Outputs, num_clients: int) -> list[tuple[int, Outputs]]:
        """Split a step's message by the client each request came from (`route_outputs`)."""
        return route_outputs(message, self._clients, num_clients)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


def route_outputs(message: Outputs, clients: dict[str, int], num_clients: int) -> list[tuple[int, Outputs]]:
    """(client, message) pairs: each client gets its requests' outputs and refusals and the whole metric delta
    (every API process keeps the engine's series); a client with none of either gets nothing. `clients`
    maps the requests of clients other than 0 to theirs; a request's entry goes with its last output."""
    if not clients:  # only client 0 has requests in flight
        parts = [(0, message)]
        if message.metrics is not None:
            parts += [(client, Outputs([], [], message.metrics)) for client in range(1, num_clients)]
        return parts
    outputs: dict[int, list[TokenOutput]] = {}
    rejected: dict[int, list[Rejected]] = {}
    for output in message.outputs:
        client = (clients.pop(output.request_id, 0) if output.finish_reason is not None
                  else clients.get(output.request_id, 0))
        outputs.setdefault(client, []).append(output)
    for refusal in message.rejected:
        rejected.setdefault(clients.pop(refusal.request_id, 0), []).append(refusal)
    return [(client, Outputs(outputs.get(client, []), rejected.get(client, []), message.metrics))
            for client in range(num_clients)
            if client in outputs or client in rejected or message.metrics is not None]


def _token_output(output: RequestOutput) -> TokenOutput:
    return TokenOutput(output.request_id, output.new_token_ids, output.new_logprobs,
                       output.finish_reason if output.finished else None, output.prompt_tokens,
                       output.completion_tokens, output.error, output.new_top_logprobs, output.prompt_logprobs,
                       output.ends_on_stop_token)


def serve(core: EngineCore, inputs: zmq.Socket, outputs: list[zmq.Socket]) -> None:
    """Read inputs, step, send each client its outputs, until every client has sent Shutdown."""
    _, decoder = input_codec()
    encoder, _ = output_codec()
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    num_clients = len(outputs)
    open_clients = set(range(num_clients))
    while True:
        timeout = 0 if core.engine.has_unfinished() else LOADING_POLL_MS if core.is_loading else IDLE_POLL_MS
        if poller.poll(timeout):
            while True:
                try:
                    message: EngineInput = decoder.decode(inputs.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(message, Shutdown):
                    open_clients.discard(message.client)
                    if not open_clients:
                        return
                elif isinstance(message, RelayMetrics):
                    frame = encoder.encode(Outputs([], [], message.delta))
                    for client, socket in enumerate(outputs):
                        if client != message.client:
                            socket.send(frame)
                else:
                    core.handle(message)
                    if hop_trace.TRACE.enabled and isinstance(message, AddRequest):
                        hop_trace.TRACE.mark(message.request_id, "engine_received")
        core.take_loaded()
        message = core.step()
        if message is not None:
            if hop_trace.TRACE.enabled:  # before the send: the receiver may have it before send returns
                for output in message.outputs:
                    if output.completion_tokens == 1:
                        hop_trace.TRACE.mark(output.request_id, "engine_sent")
            for client, part in core.route(message, num_clients):
                outputs[client].send(encoder.encode(part))


def _exit_with_parent(parent_pid: int) -> None:
    """End this process soon after the process that started it (the API process, or server.launcher's) is
    gone, even mid-load or mid-step (it may have been killed, or have exited without a shutdown): nobody
    is left to read the outputs."""
    wait_while_parent(parent_pid, PARENT_CHECK_S)
    log.warning("the API process is gone: the engine process exits")
    os._exit(0)


def run_engine_core(settings: Settings, hf_dir: str, model_id: str, endpoints: list[tuple[str, str]],
                    parent_pid: int, ignore_sigterm: bool = False) -> None:
    """Entry point of the engine process: load, send Ready (or Failed) to every client, serve until told to
    stop. `endpoints`: each client's (input, output) addresses, bound by the client; its index is its number.
    `ignore_sigterm`: server.launcher's engine, which a SIGTERM to the whole group (systemd's default) must not
    end before the API processes have drained; it ends after their Shutdowns, or is killed."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    # Ctrl-C reaches the whole process group: the API process decides when the engine stops (after a drain).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="loraplex-parent-watch", daemon=True).start()
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)  # fair-queued over every client's input socket
    inputs.setsockopt(zmq.LINGER, 0)
    outputs = []
    for input_address, output_address in endpoints:
        inputs.connect(input_address)
        output = context.socket(zmq.PUSH)
        output.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader; the API process drains it
        output.setsockopt(zmq.LINGER, SEND_LINGER_MS)
        output.connect(output_address)
        outputs.append(output)
    encoder, _ = output_codec()

    def send_all(message) -> None:
        frame = encoder.encode(message)
        for output in outputs:
            output.send(frame)

    core = None
    try:
        try:
            core = EngineCore.build(settings, Path(hf_dir), model_id)
        except Exception as exc:
            log.exception("engine startup failed")
            send_all(Failed(f"{type(exc).__name__}: {exc}"))
            return
        if settings.freeze_heap:
            freeze_startup_heap("engine process")
        send_all(core.ready_message())
        with profiled("engine"):
            serve(core, inputs, outputs)
    except BaseException as exc:
        log.exception("engine loop died")
        send_all(Failed(f"the engine stopped: {type(exc).__name__}"))
        raise
    finally:
        if core is not None:
            core.close()
        inputs.close()
        for output in outputs:
            output.close()
        context.term()
