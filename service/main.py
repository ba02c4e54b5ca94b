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
from starlette.routing import Route

import csmf
from service.errors import install_error_handlers
from service.metrics import ROUTES, ServiceMetrics
from service.routes import admin, health, retrieve
from service.settings import Settings
from service.state import AppState

_ROUTES = frozenset(ROUTES)


class EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task overhead): rejects bodies whose content-length is
    over the limit with 413 before any parsing, and records latency by route template and status."""

    def __init__(self, app, metrics: ServiceMetrics, max_body: int) -> None:
        self.app = app
        self.metrics = metrics
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

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(_route(scope), status, perf_counter() - start)


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
    # The hot path is matched by a plain Starlette route placed first: FastAPI's APIRoute adds
    # ~18 µs per request (dependency solving for a lone `Request` parameter) that this endpoint,
    # which parses its own body, does not use. The APIRoute stays for the OpenAPI schema.
    app.router.routes.insert(0, Route("/v1/retrieve", retrieve.retrieve, methods=["POST"]))
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_middleware(EdgeMiddleware, metrics=metrics, max_body=settings.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    return create_app(Settings())
