"""Liveness, readiness and Prometheus metrics.

``/readyz`` answers 503 only while no bundle is loaded. A degraded store (Redis away) is reported
in the body (``"status": "degraded"``) and in ``csmf_store_up``, but stays 200: the service is
still correct with the last known scenarios, and pulling every replica out of the load balancer
on a Redis blip would turn a control-plane outage into a full outage. An index engine that
cannot answer (a Milvus server away) is reported the same way (``"index": {"state": "down"}``):
retrieve answers 503 meanwhile, and every replica shares that engine, so taking them out of the
balancer would not help.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from service.deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="A bundle is loaded; store states (ok / degraded)")
def readyz(state: State) -> JSONResponse:
    ready, body = state.readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format; unauthenticated, see "
    "CSMF_METRICS_SCENARIO_LABELS)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(state: State) -> Response:
    data, content_type = state.metrics.render()
    return Response(data, media_type=content_type)
