"""create_app(): the FastAPI app. Its lifespan loads the model and starts the engine in the
background (so /health and /ready answer while loading) and drains and stops the engine on exit."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import adapters, generate, openai, ops
from server.api.body_limit import BodyLimit, BodyLimitMiddleware
from server.api.errors import CatchAllMiddleware, install_error_handlers
from server.api.middleware import LifecycleMiddleware
from server.api.state import Phase, ServerState
from server.config import Settings
from server.engine.engine_handle import EngineAttachment
from server.model.loader import LoadedModel

log = logging.getLogger(__name__)


def create_app(settings: Settings, loaded: LoadedModel | None = None,
               attachment: EngineAttachment | None = None) -> FastAPI:
    """Build the app for `settings`; `loaded` skips loading the model (tests, embedding); `attachment`: one of
    several API processes, reaching the engine process server.launcher started."""
    state = ServerState(settings, attachment)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(_start(app, state, loaded))
        yield
        await state.drain(settings.request_timeout_s)
        if starting.done():
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  description="Multi-tenant LoRA adapter inference server (OpenAI, TGI and vLLM-style APIs)")
    app.state.server = state
    app.state.on_startup_failure = None
    install_error_handlers(app)
    app.add_middleware(LifecycleMiddleware, state=state)
    app.add_middleware(BodyLimitMiddleware,
                       default=BodyLimit(settings.max_request_body_bytes, "max_request_body_bytes"),
                       upload=BodyLimit(settings.max_upload_bytes, "max_upload_bytes"))
    app.add_middleware(CatchAllMiddleware)  # added last: outermost of ours
    for module in (ops, openai, generate, adapters):
        app.include_router(module.router)
    return app


async def _start(app: FastAPI, state: ServerState, loaded: LoadedModel | None) -> None:
    try:
        await asyncio.to_thread(state.start, loaded)
    except Exception as exc:
        state.phase, state.load_error = Phase.FAILED, f"{type(exc).__name__}: {exc}"
        log.exception("startup failed")
        if app.state.on_startup_failure is not None:
            app.state.on_startup_failure()
