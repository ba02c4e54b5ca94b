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
from service.routes import admin, health, retrieve
from service.settings import Settings
from service.state import AppState

_ROUTES = frozenset(ROUTES)
FAST_PATH = "/v1/retrieve"


class EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task overhead), the outermost layer of ours:

    * rejects bodies whose content-length is over the limit with 413 before any parsing;
    * serves POST /v1/retrieve itself (the fast path): the framework layers below it (exception
      middleware, router, route and request wrappers) cost ~20 µs of a ~50 µs non-search
      request, measured with the retrieval stubbed out; errors still go through
      ``service.errors.error_response``, the one mapping to HTTP;
    * records latency by route template and status.
    """

    def __init__(self, app, state: AppState, max_body: int) -> None:
        self.app = app
        self.state = state
        self.metrics = state.metrics
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                msg = f"request body is {int(value)} bytes, the limit is {self.max_body}"
                await JSONResponse({"detail": msg}, status_code=413)(scope, receive, send)
                self.metrics.observe_request(_route(scope), 413, perf_counter() - start)
                return

        if scope["path"] == FAST_PATH and scope["method"] == "POST":
            status = await self._retrieve(scope, receive, send, start)
            self.metrics.observe_request(FAST_PATH, status, perf_counter() - start)
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

    async def _retrieve(self, scope, receive, send, start: float) -> int:
        try:
            payload = retrieve.retrieve_json(
                self.state, await _read_body(receive, self.max_body), start
            )
        except _Disconnected:
            return 499  # the client went away; nothing to answer
        except Exception as exc:
            response = error_response(exc)
            await response(scope, receive, send)
            return response.status_code
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return 200


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
    metrics = ServiceMetrics()
    state = AppState(settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Single queries search on this (the event loop's) thread with one OpenMP thread:
        # DESIGN §8 measured 2 threads on one query as 2x slower. The setting is per thread.
        faiss.omp_set_num_threads(1)
        state.start()
        try:
            yield
        finally:
            state.stop()
            metrics.process_exit()

    app = FastAPI(
        title="csmf-retrieval",
        version=csmf.__version__,
        description="Multi-objective embedding retrieval (CSMF): per-request and per-scenario "
        "objective weights over one FAISS index.",
        lifespan=lifespan,
    )
    app.state.csmf = state
    install_error_handlers(app)
    app.include_router(retrieve.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_middleware(EdgeMiddleware, state=state, max_body=settings.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    return create_app(Settings())
