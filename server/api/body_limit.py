"""Request body limits, applied before any work: a declared Content-Length over the limit is refused
before a byte of the body is read, and a body without one (chunked) or longer than it claims is cut
off at the first chunk past the limit. Either way the answer is a 413 naming the setting, sent at
once; the app reads, parses and keeps nothing more of that body. (uvicorn then discards whatever the
client still sends, so a client that writes its whole body before reading gets the 413 rather than a
connection reset.) Adapter uploads have their own, larger limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, error_response

UPLOAD_PATH_PREFIX = "/v1/adapters/"


@dataclass(frozen=True)
class BodyLimit:
    """At most `num_bytes` of body, as the setting called `setting` says."""

    num_bytes: int
    setting: str

    def error(self, what: str) -> APIError:
        return APIError(413, f"{what} is larger than {self.setting} ({self.num_bytes} bytes)")


class BodyTooLargeError(Exception):
    """Raised from `receive` once the body passes its limit; the middleware answers 413."""


class BodyLimitMiddleware:
    """Pure ASGI middleware that counts body bytes as they arrive."""

    def __init__(self, app: ASGIApp, default: BodyLimit, upload: BodyLimit):
        self.app = app
        self.default = default
        self.upload = upload

    def limit_for(self, scope: Scope) -> BodyLimit:
        if scope["method"] == "PUT" and scope["path"].startswith(UPLOAD_PATH_PREFIX):
            return self.upload
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit.num_bytes:
            await error_response(limit.error(f"the request body ({declared} bytes)"))(scope, receive, send)
            return
        num_received, is_over, is_started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal num_received, is_over
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > limit.num_bytes:
                    is_over = True
                    raise BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal is_started
            if is_over:  # whatever the app made of BodyTooLargeError, the answer is the 413 below
                return
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not is_over:
                raise
        if is_over and not is_started:
            await error_response(limit.error("the request body"))(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
