"""The FastAPI app: ``create_app(settings)``. Heavy loading happens in the lifespan.

``uvicorn --factory service.main:app_from_env`` builds it from ``CSMF_*`` environment variables
(what ``csmf serve`` does for each worker).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from time import perf_counter

import faiss
from fastapi import FastAPI

import csmf
from service.body_limit import Disconnected, read_body, replay
from service.errors import PayloadTooLargeError, error_response, install_error_handlers
from service.metrics import ROUTES, ServiceMetrics
from service.openapi import install_openapi
from service.routes import admin, feedback, health, items, playground, retrieve
from service.settings import Settings
from service.state import AppState

_ROUTES = frozenset(ROUTES)
FAST_PATH = "/v1/retrieve"


class CsmfApp(FastAPI):
    """FastAPI, with one edge in front of every HTTP request and POST /v1/retrieve answered there.

    The edge reads the body under the one limit of every route (``service/body_limit.py``: 413
    before routing, authentication or parsing), records the latency metric by route and status,
    and renders its own errors through ``service.errors.error_response`` (the one mapping to
    HTTP). Starlette/FastAPI wrap every request in several ASGI layers (error and exception
    middleware, the router, route and request wrappers); for the one hot route they cost about as
    much as the retrieval's own Python, so the edge answers POST /v1/retrieve itself with the body
    it has read. Every other request, and the OpenAPI description of /v1/retrieve, goes through
    the normal stack, which receives the body already read.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan
            await super().__call__(scope, receive, send)
            return
        state: AppState = self.state.csmf
        start = perf_counter()
        status = 500
        fast = scope["path"] == FAST_PATH and scope["method"] == "POST"
        try:
            try:
                body = await read_body(scope, receive, state.settings.max_body_bytes)
            except PayloadTooLargeError as exc:
                # The rest of the body is never read: close the connection rather than drain it.
                status = await _send_error(exc, scope, receive, send, close=True)
                return
            if fast:
                status = await _fast_retrieve(state, body, scope, receive, send, start)
            else:
                status = await self._framework(scope, replay(body, receive), send)
        except Disconnected:
            status = 499  # the client went away before its body was complete; nothing to answer
        finally:
            state.metrics.observe_request(
                FAST_PATH if fast else _route(scope), status, perf_counter() - start
            )

    async def _framework(self, scope, receive, send) -> int:
        """FastAPI's stack; the status it answered (500 if it raised before answering)."""
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # An unhandled error is answered 500 by FastAPI's error middleware, which then re-raises
        # it (for the server's log): the caller's status stays 500.
        await super().__call__(scope, receive, send_status)
        return status


async def _fast_retrieve(state: AppState, body: bytes, scope, receive, send, start: float) -> int:
    try:
        payload = retrieve.retrieve_json(state, body, start)
    except Exception as exc:
        return await _send_error(exc, scope, receive, send)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    return 200


async def _send_error(exc: Exception, scope, receive, send, close: bool = False) -> int:
    response = error_response(exc)
    if close:
        response.headers["connection"] = "close"
    await response(scope, receive, send)
    return response.status_code


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
    app.include_router(items.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    return app


def app_from_env() -> FastAPI:
    return create_app(Settings())
