"""Adapter management: upload (new version), list, inspect, delete; vLLM's load/unload aliases.

The aliases answer as vLLM does: plain text `Success: LoRA adapter '<name>' added successfully.` (or
`removed`) and 400 for an adapter that cannot be loaded (missing files, invalid config or weights);
loading an existing name stores a new version, as an upload does.

Uploads are multipart with parts `adapter_config.json` + `adapter_model.safetensors`, or one
`archive` part (.tar.gz or .zip). The body is counted while it is read and refused with 413 as soon
as it passes max_upload_bytes; nothing becomes visible until the store has validated and committed it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from adapters_store import (
    NAME_RE,
    AdapterError,
    AdapterNotFoundError,
    AdapterStorageFullError,
    InvalidAdapterNameError,
    validate_name,
)
from server.api.auth import Principal
from server.api.deps import AdminCaller, Caller, StateDep
from server.api.errors import ERROR_RESPONSES, APIError, adapter_not_found
from server.api.multipart import MalformedMultipartError, boundary_of, split_parts
from server.api.schemas import AdapterList, AdapterOut, LoadLoraRequest, UnloadLoraRequest
from server.api.state import ServerState
from server.engine.step_trace import StepTrace

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["adapters"], responses=ERROR_RESPONSES)
CONFIG_PART, WEIGHTS_PART, ARCHIVE_PART = "adapter_config.json", "adapter_model.safetensors", "archive"
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {name: {"type": "string", "format": "binary"}
                           for name in (CONFIG_PART, WEIGHTS_PART, ARCHIVE_PART)},
        }}},
    }
}


def _checked_name(name: str, param: str = "name") -> str:
    try:
        return validate_name(name)
    except InvalidAdapterNameError as exc:
        raise APIError(400, str(exc), param=param) from None


def _path_name(request: Request, name: str) -> str:
    """The adapter name of a /v1/adapters/{name} route, checked against the raw path: the route regex
    ends in `$`, which also matches before a trailing newline, so `good%0A` would arrive as `good`."""
    path = request.scope["path"]
    if not path.endswith("/" + name):
        tail = path.rsplit("/adapters/", 1)[-1]
        raise APIError(400, f"invalid adapter name {tail!r}: must match {NAME_RE}", param="name")
    return _checked_name(name)


def _visible(caller: Principal, name: str, param: str = "name") -> str:
    """`name` if the caller may see it; otherwise the same 404 as a missing adapter."""
    if not caller.may_use(_checked_name(name, param)):
        raise adapter_not_found(name)
    return name


def _writable(state: ServerState, caller: Principal, name: str, param: str = "name") -> str:
    if not caller.may_use(_checked_name(name, param)):
        raise APIError(403, f"tenant {caller.tenant!r} may not manage an adapter named {name!r}", param=param)
    if name == state.model_id:
        raise APIError(409, f"adapter name {name!r} is the base model's id; choose another name", param=param)
    return name


def _storage_full(exc: AdapterStorageFullError) -> APIError:
    return APIError(507, str(exc))


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"upload is larger than max_upload_bytes ({limit} bytes)")
        yield chunk


async def _read_parts(request: Request, limit: int) -> dict[str, bytes | memoryview]:
    """The multipart parts of an upload, read with the size bound enforced as bytes arrive, then split
    in one pass on a worker thread (server.api.multipart: the weights part is a view of the body)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"upload is {declared} bytes, more than max_upload_bytes ({limit} bytes)")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(415, f"send multipart/form-data with parts {CONFIG_PART!r} and {WEIGHTS_PART!r}, "
                       f"or one {ARCHIVE_PART!r} part")
    body = bytearray()  # grows with what arrives: a declared length alone reserves no memory
    async for chunk in _bounded(request.stream(), limit):
        body += chunk
    try:
        split = await asyncio.to_thread(split_parts, body, boundary_of(content_type))
    except MalformedMultipartError as exc:
        raise APIError(400, f"malformed multipart body: {exc}") from None
    parts: dict[str, bytes | memoryview] = {}
    for key, value in split:
        if key not in (CONFIG_PART, WEIGHTS_PART, ARCHIVE_PART):
            raise APIError(400, f"unexpected part {key!r}; expected {CONFIG_PART!r} and "
                           f"{WEIGHTS_PART!r}, or {ARCHIVE_PART!r}", param=key)
        if key in parts:
            raise APIError(400, f"part {key!r} appears twice", param=key)
        parts[key] = value
    return parts


def _store_upload(state: ServerState, name: str, parts: dict[str, bytes | memoryview], owner: str):
    """(record, the validated weights when the two files were sent, else None)."""
    if ARCHIVE_PART in parts:
        if len(parts) > 1:
            raise APIError(400, f"send either {ARCHIVE_PART!r} alone or the two adapter files",
                           param=ARCHIVE_PART)
        return state.store.put_archive(name, bytes(parts[ARCHIVE_PART]), owner), None
    missing = [part for part in (CONFIG_PART, WEIGHTS_PART) if part not in parts]
    if missing:
        raise APIError(400, f"missing part {missing[0]!r}", param=missing[0])
    return state.store.put_with_weights(name, bytes(parts[CONFIG_PART]), parts[WEIGHTS_PART], owner)


async def _after_change(state: ServerState, name: str, deleted: bool = False) -> None:
    if deleted:
        state.registry.forget(name)
        state.metrics.forget_adapter(name)
    await asyncio.to_thread(state.refresh_adapter_gauges)


# LORAPLEX_STEP_TRACE=DIR: DIR/uploads-<pid>.jsonl, one line per upload: the body received and split
# (receive_ms), validated, hashed and written (store_ms), and in all (ms).
_UPLOAD_TRACE: StepTrace | None = None


def _upload_trace() -> StepTrace:
    global _UPLOAD_TRACE
    if _UPLOAD_TRACE is None:
        _UPLOAD_TRACE = StepTrace(kind="uploads")
    return _UPLOAD_TRACE


_WARMING: set[asyncio.Task] = set()  # loads started by uploads (a reference each, until done)


def _warm(state: ServerState, record, weights=None) -> None:
    """Put a version just stored in the CPU tier in the background, as vLLM's load_lora_adapter loads an
    adapter before it answers: the first request for it then skips the disk read (upload to usable:
    issue 15). With `weights` (what the upload's validation parsed: the bytes just hashed and written)
    they are copied into the tier's pages; else the version is read back as a request's would be. Keyed
    by (name, version); the response does not wait for it. The engine process keeps its own tier and
    loads at first use."""
    if state.registry is None or not state.registry.load_weights:
        return

    async def load() -> None:
        try:
            if weights is not None:
                await asyncio.to_thread(state.registry.adopt, record, weights)
            else:
                await asyncio.to_thread(state.registry.weights, record)
        except AdapterNotFoundError:
            pass  # replaced and pruned, or deleted, meanwhile: nothing to warm
        except Exception:
            log.exception("reading adapter %s v%d into the CPU tier after its upload failed",
                          record.name, record.version)

    task = asyncio.get_running_loop().create_task(load())
    _WARMING.add(task)
    task.add_done_callback(_WARMING.discard)


@router.put("/adapters/{name:path}", status_code=201, response_model=AdapterOut, openapi_extra=_UPLOAD_SCHEMA,
            summary="Upload an adapter (a new version if the name exists)")
async def put_adapter(name: str, request: Request, state: StateDep, caller: AdminCaller) -> dict:
    _writable(state, caller, _path_name(request, name))
    start = time.perf_counter()
    parts = await _read_parts(request, state.settings.max_upload_bytes)
    received = time.perf_counter()
    try:
        record, weights = await asyncio.to_thread(_store_upload, state, name, parts, caller.tenant)
    except AdapterStorageFullError as exc:
        raise _storage_full(exc) from None
    stored = time.perf_counter()
    _warm(state, record, weights)
    await _after_change(state, name)
    trace = _upload_trace()
    if trace.enabled:  # LORAPLEX_STEP_TRACE: where an upload's time goes (diagnosis only)
        trace.record(adapter=record.name, version=record.version,
                     mb=round(sum(len(p) for p in parts.values()) / 2**20, 1),
                     receive_ms=round((received - start) * 1e3, 2), store_ms=round((stored - received) * 1e3, 2),
                     ms=round((time.perf_counter() - start) * 1e3, 2))
        trace.flush()
    return record.to_public()


@router.get("/adapters", response_model=AdapterList, summary="Adapters you may use (latest versions)")
async def list_adapters(state: StateDep, caller: Caller) -> dict:
    records = await asyncio.to_thread(state.store.list)
    return {"object": "list", "data": [r.to_public() for r in records if caller.may_use(r.name)]}


@router.get("/adapters/{name:path}", response_model=AdapterOut, summary="One adapter's latest version")
async def get_adapter(name: str, request: Request, state: StateDep, caller: Caller) -> dict:
    _visible(caller, _path_name(request, name))
    try:
        record = await asyncio.to_thread(state.store.get, name)
    except AdapterNotFoundError:
        raise adapter_not_found(name) from None
    return record.to_public()


@router.delete("/adapters/{name:path}", summary="Delete every version of an adapter")
async def delete_adapter(name: str, request: Request, state: StateDep, caller: AdminCaller) -> dict:
    return await _delete(_path_name(request, name), state, caller)


async def _delete(name: str, state: ServerState, caller: Principal, param: str = "name") -> dict:
    _visible(caller, name, param)
    try:
        await asyncio.to_thread(state.store.delete, name)
    except AdapterNotFoundError:
        raise adapter_not_found(name) from None
    await _after_change(state, name, deleted=True)
    return {"id": name, "object": "adapter", "deleted": True}


def _allowed_path(state: ServerState, raw_path: str) -> Path:
    allowed = [Path(d).resolve() for d in state.settings.allowed_adapter_dirs]
    if not allowed:
        raise APIError(403, "loading adapters from server paths is disabled (allowed_adapter_dirs is empty)",
                       param="lora_path")
    try:
        path = Path(raw_path).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise APIError(400, f"lora_path is not a usable path: {exc}", param="lora_path") from None
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        raise APIError(403, "lora_path is outside the allowed adapter directories (allowed_adapter_dirs)",
                       param="lora_path")
    return path


@router.post("/load_lora_adapter", response_class=PlainTextResponse,
             summary="vLLM alias: store an adapter from a server path")
async def load_lora_adapter(body: LoadLoraRequest, state: StateDep, caller: AdminCaller) -> PlainTextResponse:
    _writable(state, caller, body.lora_name, param="lora_name")
    path = _allowed_path(state, body.lora_path)
    try:
        record = await asyncio.to_thread(state.store.put_dir, body.lora_name, path, caller.tenant)
    except AdapterStorageFullError as exc:
        raise _storage_full(exc) from None
    except AdapterError as exc:
        if exc.status_code >= 500:
            raise
        raise APIError(400, f"Loading lora {body.lora_name} failed: {exc}", param="lora_path") from None
    _warm(state, record)
    await _after_change(state, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, summary="vLLM alias: delete an adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, state: StateDep, caller: AdminCaller) -> PlainTextResponse:
    try:
        await _delete(body.lora_name, state, caller, param="lora_name")
    except APIError as exc:
        if exc.status_code != 404:
            raise
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
