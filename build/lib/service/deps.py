"""FastAPI dependencies: the app state and the admin bearer-token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import AuthError
from service.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.csmf


State = Annotated[AppState, Depends(get_state)]


def require_admin(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    """401 without a bearer token, 403 with a wrong one or when the admin API is disabled."""
    token = state.settings.admin_token
    if token is None:
        raise AuthError(403, "admin API is disabled: set CSMF_ADMIN_TOKEN to enable it")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthError(
            401, "missing bearer token: send 'Authorization: Bearer <CSMF_ADMIN_TOKEN>'"
        )
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise AuthError(403, "invalid admin token")


Admin = Depends(require_admin)
