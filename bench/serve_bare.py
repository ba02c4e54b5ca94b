"""The "bare endpoint" of bench/serve.py: the same uvicorn/FastAPI stack, request bodies and
response size as the service, doing nothing (reads the body, returns a canned 50-item response
shaped like the service's), so the service's own cost per request can be stated as a ratio.
Run with ``--workers`` like the service."""

from __future__ import annotations

import json
import sys

from fastapi import FastAPI, Request, Response

app = FastAPI()
BODY = json.dumps(
    {
        "items": [
            {
                "item_id": f"i{123456 + j}",
                "score": 3.14159 - j / 100,
                "meta": {"title": f"Item {j}"},
            }
            for j in range(50)
        ],
        "weights": {"exposure": 1.0, "click": 1.8, "conversion": 1.2},
        "scenario": "default",
        "model_version": "0123456789abcdef",
        "cold_start": False,
        "took_ms": 0.5,
    }
).encode()


@app.post("/v1/retrieve")
async def retrieve(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ok", "model_version": "bare"}


def run(app: str, port: int, workers: int) -> None:
    """Serve ``app`` ("module:attribute", imported by each worker) on loopback as the benchmark
    loads every server: ``workers`` processes, no access log."""
    import uvicorn

    uvicorn.run(
        app, host="127.0.0.1", port=port, workers=workers, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    run("serve_bare:app", int(sys.argv[1]), int(sys.argv[2]))
