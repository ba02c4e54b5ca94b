"""Service errors and the one place that maps every domain error to an HTTP response.

Bad input is a 422 in FastAPI's own shape (``{"detail": [{"loc", "msg", "type"}]}``) whose
``loc`` names the field; every other error is ``{"detail": "<message>"}``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from csmf.errors import (
    BundleError,
    CsmfError,
    FeatureError,
    IndexUnavailableError,
    ItemWriteError,
    WeightsError,
)
from csmf.item_log import ItemLogError

log = logging.getLogger("csmf.service")


class FieldError(CsmfError, ValueError):
    """A request field is invalid (→ 422 naming the field)."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = tuple(loc)
        self.msg = msg


class UnknownScenarioError(CsmfError, KeyError):
    """No scenario of that name (→ 404). The message names no other scenario: retrieve is
    public, and scenario names can be business information (admins list them with
    GET /admin/scenarios)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.msg = f"unknown scenario {name!r} (an admin lists them with GET /admin/scenarios)"

    def __str__(self) -> str:
        return self.msg


class UnknownRequestIdError(CsmfError, KeyError):
    """Feedback for a request id this service did not issue (for that user), or expired."""

    def __str__(self) -> str:
        return str(self.args[0])


class PayloadTooLargeError(CsmfError, ValueError):
    """The body or the batch is larger than allowed (→ 413)."""


class AuthError(CsmfError, PermissionError):
    """Admin call without a valid bearer token (→ 401 missing, 403 wrong or admin disabled)."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


class ConflictError(CsmfError, RuntimeError):
    """The request conflicts with the current state (→ 409): a reload already running, deleting
    the default scenario."""


class StoreUnavailableError(CsmfError, ConnectionError):
    """The shared store cannot take a write right now (→ 503); reads keep the last known state."""


class ReloadError(CsmfError, ValueError):
    """A new bundle failed to load or verify; the old one keeps serving (→ 422)."""

    def __init__(self, msg: str, serving: str) -> None:
        super().__init__(msg)
        self.serving = serving


def _unprocessable(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> JSONResponse:
    return JSONResponse(
        {"detail": [{"loc": list(loc), "msg": msg, "type": type_}]}, status_code=422
    )


def validation_response(exc: ValidationError, prefix: Sequence[str] = ("body",)) -> JSONResponse:
    """A pydantic ValidationError from manual parsing → the same 422 FastAPI would send."""
    detail = [
        {"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def error_response(exc: Exception) -> JSONResponse:
    """The one mapping from a domain error to an HTTP response."""
    if isinstance(exc, FieldError):
        return _unprocessable(["body", *exc.loc], exc.msg)
    if isinstance(exc, WeightsError):
        return _unprocessable(["body", "weights"], str(exc))
    if isinstance(exc, FeatureError):
        return _unprocessable(["body"], str(exc))
    if isinstance(exc, ValidationError):
        return validation_response(exc)
    if isinstance(exc, UnknownScenarioError):
        return JSONResponse({"detail": exc.msg}, status_code=404)
    if isinstance(exc, UnknownRequestIdError):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    if isinstance(exc, PayloadTooLargeError):
        return JSONResponse({"detail": str(exc)}, status_code=413)
    if isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)
    if isinstance(exc, ConflictError):
        return JSONResponse({"detail": str(exc)}, status_code=409)
    if isinstance(exc, StoreUnavailableError | IndexUnavailableError):
        return JSONResponse({"detail": str(exc)}, status_code=503)
    if isinstance(exc, ReloadError):
        return JSONResponse({"detail": str(exc), "serving": exc.serving}, status_code=422)
    if isinstance(exc, BundleError):
        return JSONResponse({"detail": str(exc)}, status_code=422)
    if isinstance(exc, ItemLogError):  # the log cannot take writes until an operator repairs it
        return JSONResponse({"detail": str(exc)}, status_code=503)
    if isinstance(exc, ItemWriteError):
        return JSONResponse({"detail": str(exc)}, status_code=422)
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


# FastAPI's answer when a JSON body cannot even be decoded (not UTF-8): a bare 400. The retrieve
# routes parse their bodies themselves and answer 422 for the same input; answer it alike.
_BODY_PARSE_ERROR = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def handle_http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
            return _unprocessable(["body"], "the body is not valid JSON in UTF-8", "json_invalid")
        return await http_exception_handler(request, exc)

    for cls in (CsmfError, ValidationError, Exception):
        app.add_exception_handler(cls, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
