"""Operations routes: liveness, readiness and Prometheus metrics (no auth unless metrics_require_key or
metrics_key_sha256 protects /metrics; keep them on the pod network)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import MetricsReader, StateDep
from server.api.errors import APIError, error_response, retry_after
from server.api.state import Phase
from server.metrics import REGISTRY

router = APIRouter(tags=["ops"])
_NOT_READY = {
    Phase.LOADING: "the model is loading",
    Phase.DRAINING: "the server is draining before shutdown",
    Phase.STOPPED: "the server has stopped",
}


@router.get("/health", summary="Liveness: 200 while the engine loop runs (and while loading)")
async def health(state: StateDep) -> Response:
    if not state.is_alive:
        reason = state.failure_reason
        return error_response(APIError(503, f"unhealthy: {reason}"))
    if state.phase is Phase.LOADING:  # which loading step, and how long the finished ones took
        from server.model.loader import LOAD_PROGRESS

        return JSONResponse({"status": state.phase.value, "loading": LOAD_PROGRESS.snapshot()})
    return JSONResponse({"status": state.phase.value})


@router.get("/ready", summary="Readiness: 200 once the model is loaded, 503 while loading or draining")
async def ready(state: StateDep) -> Response:
    if state.is_ready and state.is_alive:
        return JSONResponse({"status": "ready", "model": state.model_id})
    reason = _NOT_READY.get(state.phase) or (f"failed to start: {state.load_error}" if state.load_error
                                             else f"the engine stopped: {state.failure_reason}")
    return error_response(APIError(503, f"not ready: {reason}", headers=retry_after(5)))


@router.get("/metrics", summary="Prometheus metrics (vLLM names plus loraplex_*; a key when metrics_require_key)")
async def prometheus_metrics(_: MetricsReader, state: StateDep) -> Response:
    await asyncio.to_thread(state.refresh_adapter_gauges)  # the store may have changed through another process
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
