"""FastAPI dependencies: the shared state, the authenticated caller, scope checks and rate limits."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.auth import OPEN_PRINCIPAL, Principal, hash_key
from server.api.errors import APIError
from server.api.state import ServerState

_bearer = HTTPBearer(auto_error=False, description="an API key from the keys file (open mode: none)")


# Dependencies are `async def` though nothing in them awaits: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per dependency per request (with the engine thread holding the GIL in
# turns, a measured ~1 ms of a cached-prefix hit's time to first token).


async def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_principal(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller behind the bearer key; 401 when it is missing or unknown (open mode: everyone)."""
    if state.keyring is None:
        return OPEN_PRINCIPAL
    if credentials is None or not credentials.credentials:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    principal = state.keyring.authenticate(credentials.credentials)
    if principal is None:
        raise APIError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return principal


def _require(scope: str):
    async def check(state: StateDep, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.has_scope(scope):
            raise APIError(403, f"this API key (tenant {principal.tenant!r}) lacks the {scope!r} scope")
        state.limiter.check_request(principal)
        return principal

    return check


Caller = Annotated[Principal, Depends(get_principal)]
GenerateCaller = Annotated[Principal, Depends(_require("generate"))]
AdminCaller = Annotated[Principal, Depends(_require("admin"))]


async def require_metrics_reader(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """When /metrics is protected (metrics_require_key or metrics_key_sha256), let through only the
    metrics key or an admin-scope API key: adapter names of every tenant appear in the metrics."""
    settings = state.settings
    if not settings.is_metrics_protected:
        return
    if credentials is None or not credentials.credentials:
        raise APIError(401, "/metrics needs a key: send 'Authorization: Bearer <key>' (the metrics key "
                       "or an admin-scope API key)", headers={"WWW-Authenticate": "Bearer"})
    digest = hash_key(credentials.credentials)
    if settings.metrics_key_sha256 and hmac.compare_digest(digest, bytes.fromhex(settings.metrics_key_sha256)):
        return
    principal = state.keyring.authenticate(credentials.credentials) if state.keyring else None
    if principal is None:
        raise APIError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    if not principal.has_scope("admin"):
        raise APIError(403, f"this API key (tenant {principal.tenant!r}) lacks the 'admin' scope /metrics needs")


MetricsReader = Annotated[None, Depends(require_metrics_reader)]
