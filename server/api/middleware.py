"""Lifecycle gate: refuse new work (503) while loading or draining, and count requests in flight."""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import hop_trace
from server.api.errors import APIError, error_response, retry_after
from server.api.state import Phase, ServerState

# Probes and docs answer in every phase and do not hold up a drain.
ALWAYS_OPEN = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json"})
# time.monotonic() when the app received the current HTTP request (for loraplex_http_admission_seconds)
RECEIVED_AT: ContextVar[float | None] = ContextVar("loraplex_received_at", default=None)


class LifecycleMiddleware:
    """Pure ASGI middleware (streaming responses count until their last byte is sent)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        RECEIVED_AT.set(time.monotonic())  # this request's task and what it awaits see it
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        if not self.state.is_ready:
            reason = {
                Phase.LOADING: "the model is loading",
                Phase.DRAINING: "the server is shutting down",
            }.get(self.state.phase, "the server is not running")
            await error_response(APIError(503, f"{reason}; retry later", headers=retry_after(5)))(
                scope, receive, send
            )
            return
        self.state.num_active_requests += 1
        if hop_trace.TRACE.enabled:
            send = _traced_send(send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_active_requests -= 1


def _traced_send(send: Send) -> Send:
    """`send`, marking the response's start and its first body chunk (server.hop_trace; tracing only)."""
    request_id: str | None = None
    body_seen = False

    async def traced(message: Message) -> None:
        nonlocal request_id, body_seen
        if message["type"] == "http.response.start":
            request_id = next((v.decode() for k, v in message.get("headers", []) if k.lower() == b"x-request-id"),
                              None)
            if request_id is not None:
                hop_trace.TRACE.mark(request_id, "api_response_start")
        await send(message)
        if message["type"] == "http.response.body" and request_id is not None and not body_seen:
            body_seen = True
            hop_trace.TRACE.mark(request_id, "api_first_body_sent")

    return traced
