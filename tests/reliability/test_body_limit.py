"""One body limit for every route (docs/design.md#the-request-path): a 100 MB chunked body (no
content-length) sent to each route of a real `csmf serve` on loopback — admin routes without a
token — is answered 413 naming the limit and its setting, and the worker's peak resident memory
(VmHWM) grows by far less than the body: the server reads at most CSMF_MAX_BODY_BYTES of it.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from service.main import create_app

BODY_MB = 100
CHUNK = b"x" * (1 << 16)
RSS_GROWTH_MB = 100  # the body is 100 MB; a server that buffered it would pass this alone


def _routes(bundle: Path, tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves: the documented ones from its OpenAPI
    document and the undocumented ones (/docs, /openapi.json, ...), path parameters filled in."""
    from fixtures.services import settings_for

    app = create_app(settings_for(bundle, tmp_path))
    out = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    for route in app.routes:  # the app's own; included routers are in the OpenAPI document
        if hasattr(route, "path"):
            out |= {(m, route.path) for m in route.methods if m != "HEAD"}
    return sorted((m, re.sub(r"\{[^}]+\}", "abc", p)) for m, p in out)


def _peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _body():  # 100 MB, lazily: the client holds one 64 KiB chunk
    for _ in range(BODY_MB * (1 << 20) // len(CHUNK)):
        yield CHUNK


@pytest.mark.slow
def test_every_route_refuses_a_100mb_chunked_body(serve, bundles, tmp_path, report):
    limit = 1 << 20
    routes = _routes(bundles["flat"], tmp_path)
    assert ("POST", "/v1/retrieve") in routes and ("PUT", "/admin/scenarios/abc") in routes
    svc = serve(bundles["flat"], CSMF_MAX_BODY_BYTES=str(limit))
    assert svc.client.post("/v1/retrieve", json={"user_id": "u1"}).status_code == 200
    before = _peak_kb(svc.proc.pid)
    with httpx.Client(base_url=svc.url, timeout=60) as client:  # no admin token
        for method, path in routes:
            r = client.request(
                method, path, content=_body(), headers={"content-type": "application/json"}
            )
            assert r.status_code == 413, (method, path, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert f"limit of {limit} bytes" in detail and "CSMF_MAX_BODY_BYTES" in detail
    growth_mb = (_peak_kb(svc.proc.pid) - before) / 1024
    assert growth_mb < RSS_GROWTH_MB, f"peak RSS grew by {growth_mb:.0f} MB"
    # Still serving, on a fresh connection (each 413 closed its own).
    assert svc.client.post("/v1/retrieve", json={"user_id": "u1"}).status_code == 200
    report.add(
        "Body limit: a 100 MB chunked body to every route",
        {
            "routes": len(routes),
            "status": "413 on every one",
            "limit (CSMF_MAX_BODY_BYTES)": f"{limit:,} bytes",
            "worker peak RSS growth": f"{growth_mb:.1f} MB",
        },
    )
