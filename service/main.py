"""The FastAPI app: ``create_app(settings)``. Heavy loading happens in the lifespan.

``uvicorn --factory service.main:app_from_env`` builds it from ``CSMF_*`` environment variables
(what ``csmf serve`` does for each worker).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from time import perf_counter

import faiss
from fastapi import FastAPI
from fastapi.responses import JSONResponse

import csmf
from service.errors import PayloadTooLargeError, error_response, install_error_handlers
from service.metrics import ROUTES, ServiceMetrics
from service.openapi import install_openapi
from service.routes import admin, feedback, health, playground, retrieve
from service.settings import Settings
from service.state import AppState

_ROUTES = frozenset(ROUTES)
FAST_PATH = "/v1/retrieve"


class CsmfApp(FastAPI):
    """FastAPI, except that POST /v1/retrieve is answered before the framework's layers.

    Starlette/FastAPI wrap every request in several ASGI layers (error and exception middleware,
    OpenTelemetry hooks, body limits, the router, route and request wrappers); for the one hot
    route they cost about as much as the retrieval's own Python. The fast path does what those
    layers would do for it: the body limit (413), errors through ``service.errors.error_response``
    (the one mapping to HTTP), and the latency metric. Every other request, and the OpenAPI
    description of /v1/retrieve, goes through the normal stack.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == FAST_PATH and scope["method"] == "POST":
            state: AppState = self.state.csmf
            start = perf_counter()
            status = await _fast_retrieve(state, scope, receive, send, start)
            state.metrics.observe_request(FAST_PATH, status, perf_counter() - start)
            return
        await super().__call__(scope, receive, send)


async def _fast_retrieve(state: AppState, scope, receive, send, start: float) -> int:
    limit = state.settings.max_body_bytes
    try:
        too_large = _declared_too_large(scope, limit)
        if too_large:
            raise PayloadTooLargeError(too_large)
        payload = retrieve.retrieve_json(state, await _read_body(receive, limit), start)
    except _Disconnected:
        return 499  # the client went away; nothing to answer
    except Exception as exc:
        response = error_response(exc)
        await response(scope, receive, send)
        return response.status_code
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    return 200


class EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task overhead), the outermost layer of ours for every
    route but the fast path (see :class:`CsmfApp`): rejects bodies whose content-length is over
    the limit with 413 before any parsing, and records latency by route template and status."""

    def __init__(self, app, state: AppState, max_body: int) -> None:
        self.app = app
        self.metrics = state.metrics
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500
        too_large = _declared_too_large(scope, self.max_body)
        if too_large:
            await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
            self.metrics.observe_request(_route(scope), 413, perf_counter() - start)
            return

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(_route(scope), status, perf_counter() - start)


def _declared_too_large(scope, limit: int) -> str | None:
    """The 413 message if the request's content-length is over ``limit``, else None."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return f"request body is {int(value)} bytes, the limit is {limit}"
    return None


class _Disconnected(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes:
    """The request body from ASGI messages, refusing more than ``limit`` bytes (413)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _route(scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    if path is None:  # 413 before routing: the raw path, if it is one of ours
        path = scope.get("path")
    return path if path in _ROUTES else "other"


def create_app(settings: Settings) -> FastAPI:
    metrics = ServiceMetrics(settings.metrics_scenario_labels)
    state = AppState(settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Single queries search on this (the event loop's) thread with one OpenMP thread:
        # 2 threads on one query measured 2x slower (docs/design.md#performance-facts). The
        # setting is per thread.
        faiss.omp_set_num_threads(1)
        state.start()
        try:
            yield
        finally:
            state.stop()
            metrics.process_exit()

    app = CsmfApp(
        title="csmf-retrieval",
        version=csmf.__version__,
        description="Multi-objective embedding retrieval (CSMF): per-request and per-scenario "
        "objective weights over one FAISS index.",
        lifespan=lifespan,
    )
    app.state.csmf = state
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(retrieve.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    app.add_middleware(EdgeMiddleware, state=state, max_body=settings.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    return create_app(Settings())
