"""GET /playground: the weights playground page (service/static/playground.html;
docs/design.md#tune-experiment-feedback).

One self-contained HTML file (no CDN, no build step) that calls the public retrieve API and, to
save a scenario, the admin API with a token the person types (never stored)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["playground"])
PAGE = Path(__file__).resolve().parents[1] / "static" / "playground.html"


@router.get("/playground", response_class=HTMLResponse, summary="Weights playground (a web page)")
def playground() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
