"""Typed API errors and the one place every exception is mapped to an HTTP response.

Every error body has the OpenAI shape `{"error": {"message", "type", "param", "code"}}`, where
`type` is the OpenAI client's exception name for the status (e.g. "NotFoundError") and `code` the
status. Messages name the field or the reason; stack traces never leave the server.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store import AdapterError, AdapterNotFoundError
from server.api.schemas import ErrorResponse
from server.engine.async_engine import EngineDeadError, QueueFullError
from server.engine.request import SamplingError

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}
RETRY_AFTER_BUSY_S = 1
INVALID_UNICODE = "is not valid Unicode text (it holds a lone surrogate such as \\ud800)"
# OpenAPI documentation of the error body for the statuses every API route may return.
ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorResponse, "description": ERROR_TYPES[code]}
    for code in (400, 401, 403, 404, 413, 429, 503)
}


class APIError(Exception):
    """An error with an HTTP status; `param` names the offending field when there is one."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status_code, self.message, self.param)


def error_body(status_code: int, message: str, param: str | None = None) -> dict:
    """The OpenAI error object for one status and message."""
    kind = ERROR_TYPES.get(status_code) or HTTPStatus(status_code).phrase.replace(" ", "") + "Error"
    return {"error": {"message": _encodable(message), "type": kind, "param": param and _encodable(param),
                      "code": status_code}}


def _encodable(text: str) -> str:
    """`text` with lone surrogates (echoed from a request) escaped, so the body always encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def model_not_found(model: str, param: str = "model") -> APIError:
    """The one 404 for a missing adapter and for one the caller may not use (indistinguishable); `param`: the
    field that named it (TGI's `parameters.adapter_id`)."""
    what = "model" if param == "model" else "adapter"
    return APIError(404, f"The {what} {model!r} does not exist", param=param)


def adapter_not_found(name: str) -> APIError:
    return APIError(404, f"adapter {name!r} not found", param="name")


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def to_api_error(exc: Exception) -> APIError:
    """Map a domain exception (engine, store, sampling) to an APIError; unknown ones become a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc))
    if isinstance(exc, AdapterError):
        if exc.status_code >= 500:
            log.error("adapter store error: %s", exc)
            return APIError(500, "adapter storage error; see the server log")
        return APIError(exc.status_code, str(exc))
    if isinstance(exc, SamplingError):
        return APIError(400, str(exc))
    if isinstance(exc, QueueFullError):
        return APIError(503, f"server is busy: {exc}; retry later", headers=retry_after(RETRY_AFTER_BUSY_S))
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}", headers=retry_after(RETRY_AFTER_BUSY_S))
    if isinstance(exc, ClientDisconnect):  # left while its body was arriving (an abandoned upload): not our fault
        log.info("client closed the request before its body arrived")
        return APIError(499, "client closed the request")
    log.error("unhandled error: %s", exc, exc_info=exc)
    return APIError(500, "internal server error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, first_param = [], None
    for error in exc.errors()[:5]:
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
        if error.get("type") == "json_invalid":  # its loc is the body and the character where parsing failed
            position = loc[0] if loc else "?"
            reason = (error.get("ctx") or {}).get("error", "JSON decode error")
            problems.append(f"the request body is not valid JSON: {reason} at character {position}")
            first_param = first_param or "body"
            continue
        param = ".".join(loc) or None
        first_param = first_param or param
        message = INVALID_UNICODE if error.get("type") == "string_unicode" else error.get("msg")
        problems.append(f"{param}: {message}" if param else str(message))
    return "; ".join(problems) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an OpenAI-shaped error response."""

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(APIError(400, message, param=param))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    async def on_domain(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Not `Exception`: Starlette hands that one to its ServerErrorMiddleware, which re-raises after
    # answering (uvicorn then logs "Exception in ASGI application" and drops the connection).
    # CatchAllMiddleware answers those instead.
    for exc_type in (APIError, AdapterError, SamplingError, QueueFullError, EngineDeadError):
        app.add_exception_handler(exc_type, on_domain)


class CatchAllMiddleware:
    """The app's outermost middleware: an exception no handler took becomes the JSON 500 (logged once,
    by `to_api_error`) and goes no further, so the keep-alive connection stays usable. A response
    already under way is ended where it stands."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        progress = {"started": False, "complete": False}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                progress["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                progress["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            err = to_api_error(exc)
            if not progress["started"]:
                await error_response(err)(scope, receive, send)
            elif not progress["complete"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
