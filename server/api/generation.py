"""Submit one request to the engine and consume its outputs, for every generation route.

`Generation.start` validates what it can before queueing, then awaits the first output, so that
admission failures (queue full, bad parameters, prompt too long) become HTTP errors rather than
errors inside an already-started stream. Consumers iterate `outputs()`; leaving early, a timeout or
a client disconnect aborts the request inside the engine explicitly (`abort`), never by relying on a
task cancellation alone: a consumer awaiting `wait_for` swallows its one cancel when an output
arrives at the same moment, and would then run the request to its end.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec
from fastapi import Request as HTTPRequest
from starlette._utils import create_collapsing_task_group  # Starlette's own, for its exception groups
from starlette.responses import StreamingResponse

from adapters_store import NAME_RE, AdapterNotFoundError
from server import hop_trace
from server.api.auth import Principal
from server.api.errors import APIError, model_not_found, to_api_error
from server.api.middleware import RECEIVED_AT
from server.api.state import ServerState
from server.engine.request import (
    AdapterRef,
    FinishReason,
    Request,
    RequestOutput,
    SamplingError,
    SamplingParams,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_NAME = re.compile(NAME_RE)


async def resolve_model(state: ServerState, principal: Principal, model: str | None,
                        param: str = "model") -> AdapterRef | None:
    """None for the base model; the adapter's current version otherwise; 404 if the caller may not
    use it or it does not exist (the same answer for both), naming `param`, the field that named it."""
    if model is None or model == state.model_id:
        return None
    if not _NAME.fullmatch(model) or not principal.may_use(model):
        raise model_not_found(model, param)
    if (ref := state.registry.resolve_nowait(model)) is not None:
        return ref
    try:
        return await asyncio.to_thread(state.registry.resolve, model)
    except AdapterNotFoundError:
        raise model_not_found(model, param) from None


class Generation:
    """One request in the engine: a primed output stream with a deadline and token accounting."""

    def __init__(self, state: ServerState, principal: Principal, request: Request):
        self.state = state
        self.principal = principal
        self.request = request
        self.deadline = time.monotonic() + state.settings.request_timeout_s
        self._deadline = _Deadline(self.deadline)
        self.prompt_tokens = len(request.prompt_token_ids)
        self.completion_tokens = 0
        self._stream = state.engine.generate(request)
        self._first: RequestOutput | None = None
        self._is_finished = False  # the engine sent the request's last output
        self._is_aborted = False
        self._closed = False

    @classmethod
    async def start(cls, state: ServerState, principal: Principal, prompt_ids: list[int],
                    params: SamplingParams, adapter: AdapterRef | None, request_id: str,
                    prompt_field: str = "prompt") -> Generation:
        """Validate, rate-limit and queue a request; return once its first output is ready."""
        adapter_label = adapter.name if adapter else "base"
        try:
            params.validate()
            if not prompt_ids:
                raise APIError(400, f"{prompt_field} is empty", param=prompt_field)
            if len(prompt_ids) >= state.max_model_len:
                raise APIError(400, f"{prompt_field} has {len(prompt_ids)} tokens; this model's context "
                               f"(max_model_len) is {state.max_model_len} tokens", param=prompt_field)
            state.limiter.check_tokens(principal)
            request = Request(prompt_ids, params, adapter, request_id=request_id, tenant=principal.tenant)
            if (received := RECEIVED_AT.get()) is not None:
                state.metrics.observe("http_admission_seconds", (state.model_id,), request.arrival_time - received)
            if hop_trace.TRACE.enabled:
                if received is not None:
                    hop_trace.TRACE.mark(request_id, "api_received", received)
                hop_trace.TRACE.mark(request_id, "api_admitted", request.arrival_time)
            state.limiter.enter(principal, state.settings.tenant_max_queued_requests)  # left in aclose
            generation = cls(state, principal, request)
        except (SamplingError, APIError) as exc:
            state.metrics.inc("adapter_requests", (state.model_id, adapter_label, "rejected"))
            raise to_api_error(exc) from None
        try:
            generation._first = await generation._next()
            hop_trace.TRACE.mark(request_id, "api_first_output")
            state.metrics.observe("http_first_output_seconds", (state.model_id,),
                                  time.monotonic() - request.arrival_time)
        except BaseException as exc:
            await generation.aclose()
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, APIError):  # refused at admission; the engine never counted it
                state.metrics.inc("adapter_requests", (state.model_id, adapter_label, "rejected"))
            raise to_api_error(exc) from None
        return generation

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every output up to the finished one; raises APIError on engine errors or the deadline."""
        output, self._first = self._first, None
        while output is not None:
            self.completion_tokens = output.completion_tokens
            self._is_finished = output.finished
            if output.finished and output.finish_reason is FinishReason.ERROR:
                log.error("request %s failed in the engine: %s", self.request.request_id, output.error)
                raise APIError(500, "generation failed with an internal error")
            if output.finished and output.finish_reason is FinishReason.ABORT:
                raise APIError(503, "the request was aborted by the server")
            yield output
            if output.finished:
                return
            output = await self._next()

    async def collect(self, http_request: HTTPRequest) -> list[RequestOutput]:
        """All outputs of a non-streaming request; gives up (and aborts) if the client disconnects."""
        return await collect_until_disconnect(_gather(self.outputs()), http_request, self.abort, self.aclose)

    def abort(self) -> None:
        """Abort the request in the engine now unless it already finished (idempotent, never blocks)."""
        if self._is_finished or self._is_aborted:
            return
        self._is_aborted = True
        self.state.engine.abort(self.request.request_id)

    async def aclose(self) -> None:
        """Abort the request if unfinished, close the engine stream and charge the request's tokens."""
        if self._closed:
            return
        self._closed = True
        self._deadline.cancel()
        self.abort()
        try:
            await self._stream.aclose()
        except RuntimeError:  # still awaited by a consumer being cancelled; the abort above stands
            log.debug("stream of %s closed while in use", self.request.request_id)
        self.state.limiter.charge_tokens(self.principal, self.prompt_tokens + self.completion_tokens)
        self.state.limiter.leave(self.principal)

    async def _next(self) -> RequestOutput:
        try:
            if not _HAS_UNCANCEL:  # Python 3.10: a timeout per output
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                return await asyncio.wait_for(self._stream.__anext__(), remaining)
            return await self._deadline.wait(self._stream.__anext__)
        except asyncio.TimeoutError:
            timeout = self.state.settings.request_timeout_s
            raise APIError(504, f"request timed out after {timeout:g} s (request_timeout_s)") from None
        except StopAsyncIteration:
            raise APIError(503, "the engine stopped before the request finished") from None


async def collect_until_disconnect(consume_outputs: Awaitable[T], http_request: HTTPRequest,
                                   abort: Callable[[], None], aclose: Callable[[], Awaitable[None]]) -> T:
    """Await `consume_outputs` unless the client disconnects first: then `abort` (decided here, whatever
    the consumer makes of its cancellation), cancel it and answer 499. Closes (`aclose`) either way."""
    consume = asyncio.ensure_future(consume_outputs)
    watch = asyncio.ensure_future(_wait_disconnect(http_request))
    is_abandoned = False
    try:
        await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not consume.done():
            is_abandoned = True
            abort()
            consume.cancel()
            await asyncio.wait({consume})
        await aclose()
    if is_abandoned:
        if not consume.cancelled():
            consume.exception()  # it ran on to the abort output; nobody is left to tell
        raise APIError(499, "client closed the request")
    return consume.result()


async def _gather(outputs: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [output async for output in outputs]


async def _wait_disconnect(http_request: HTTPRequest) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


_encode_json = msgspec.json.Encoder().encode
_HAS_UNCANCEL = hasattr(asyncio.Task, "uncancel")  # Python 3.11+


class _Deadline:
    """A request's deadline as one timer for all its outputs. asyncio.timeout around each output cost 7 us an
    output against 0.6 for the wait itself (Python 3.11): at 32 streams the API process waits for ~8,000 outputs
    a second. When the deadline passes, the task waiting in `wait` (if one is) is cancelled, and `wait` turns
    that cancellation, and only that one, into asyncio.TimeoutError; past the deadline `wait` raises at once."""

    def __init__(self, deadline: float):  # time.monotonic(), the event loop's clock
        self._loop = asyncio.get_running_loop()
        self._deadline = deadline
        self._handle = self._loop.call_at(deadline, self._expire)
        self._waiter: asyncio.Task | None = None
        self._cancelled_waiter = False
        self.expired = False

    def _expire(self) -> None:
        self.expired = True
        if self._waiter is not None:
            self._cancelled_waiter = True
            self._waiter.cancel()

    async def wait(self, start: Callable[[], Awaitable[T]]) -> T:
        """`await start()`, or asyncio.TimeoutError once the deadline has passed."""
        if self.expired or self._loop.time() >= self._deadline:  # by the clock, even before the timer has run
            raise asyncio.TimeoutError
        task = asyncio.current_task()
        self._waiter, cancelling = task, task.cancelling()  # a count left from before is not ours to judge
        try:
            return await start()
        except asyncio.CancelledError:
            if self._cancelled_waiter:  # ours: undo our cancel request; one from elsewhere still stands
                self._cancelled_waiter = False
                if task.uncancel() <= cancelling:
                    raise asyncio.TimeoutError from None
            raise
        finally:
            self._waiter = None
            if self._cancelled_waiter:  # our cancel never arrived as a CancelledError (swallowed, replaced)
                self._cancelled_waiter = False
                task.uncancel()

    def cancel(self) -> None:
        self._handle.cancel()


def sse_event(payload: dict | str) -> bytes:
    """One server-sent event. msgspec writes the JSON (UTF-8, compact, keys in order) in about a fifth of
    json.dumps' time: at 32 streams the API process formats ~14k chunks a second. Non-finite floats become
    null (json.dumps would write NaN, which is not JSON)."""
    if isinstance(payload, str):
        return b"data: " + payload.encode() + b"\n\n"
    return b"data: " + _encode_json(payload) + b"\n\n"


class Closable(Protocol):
    async def aclose(self) -> None: ...


class SSEResponse(StreamingResponse):
    """Server-sent events whose body generator is always closed, even when the client vanishes."""

    media_type = "text/event-stream"

    def __init__(self, content: EventStream, **kwargs):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        try:
            spec_version = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
            if scope["type"] != "http" or spec_version >= (2, 4):  # a send that raises on disconnect
                await super().__call__(scope, receive, send)
                return
            # Starlette streams from a new task and watches for the disconnect in this one, so the first
            # event waited for that task's first turn of the event loop (1.3-1.5 ms p50 from the first output
            # to the response's start at c32 on the H200, bench.hop_trace). Here it is the other way round.
            async with create_collapsing_task_group() as group:

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await self.stream_response(send)
                group.cancel_scope.cancel()
            if self.background is not None:
                await self.background()
        finally:
            await self.body_iterator.aclose()


def stream_events(generation: Generation | Closable, events: AsyncIterator[dict], done_marker: bool) -> EventStream:
    """SSE lines for `events`; an error mid-stream becomes one error event (a 500 without details when it
    is not an APIError). Always closes the request (see EventStream)."""
    return EventStream(generation, _event_lines(generation, events, done_marker))


class EventStream:
    """An SSE body: its lines, and an `aclose` that closes the request even when the lines were never iterated.
    A client gone before the response started (its start message failed to send) left the generator unstarted,
    so its own `finally` never ran: the request kept its rate-limiter place and ran on in the engine."""

    def __init__(self, closable: Closable, lines: AsyncIterator[bytes]):
        self._closable = closable
        self._lines = lines

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._lines

    async def aclose(self) -> None:
        try:
            await self._lines.aclose()
        finally:
            await self._closable.aclose()


async def _event_lines(generation: Generation | Closable, events: AsyncIterator[dict],
                       done_marker: bool) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield sse_event(event)
    except Exception as exc:
        yield sse_event(to_api_error(exc).body())
    finally:
        await generation.aclose()
    if done_marker:
        yield sse_event("[DONE]")
