"""FastAPI dependencies: the shared state, the authenticated caller, scope checks and rate limits."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.auth import OPEN_PRINCIPAL, Principal
from server.api.errors import APIError
from server.api.state import ServerState

_bearer = HTTPBearer(auto_error=False, description="an API key from the keys file (open mode: none)")


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


def get_principal(
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
    def check(state: StateDep, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.has_scope(scope):
            raise APIError(403, f"this API key (tenant {principal.tenant!r}) lacks the {scope!r} scope")
        state.limiter.check_request(principal)
        return principal

    return check


Caller = Annotated[Principal, Depends(get_principal)]
GenerateCaller = Annotated[Principal, Depends(_require("generate"))]
AdminCaller = Annotated[Principal, Depends(_require("admin"))]
