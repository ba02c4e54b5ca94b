"""The "hand-written endpoint" of bench/serve.py: what a team would write in an afternoon instead
of running the service — FastAPI + the bundle's user encoder + the FAISS index, no more.

It answers the same bodies as the service with the same results (known, unknown and inline-history
users, explicit or default weights, ``exclude``, ``exclude_seen`` by the same k + |seen| search):
``orjson`` in, a dict per item out through ``orjson``. What it leaves out is what the service
adds for operators: scenarios and experiments, request ids for feedback, metrics, validation with
named errors, warnings, filters, ``explain``, hot reload. So service CPU / this endpoint's CPU, in
the same rounds, is the price of those — the comparison this benchmark exists for. Run with
``--workers`` like the service: ``python serve_handwritten.py BUNDLE PORT WORKERS``.
"""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager
from types import SimpleNamespace

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import faiss  # noqa: E402
import orjson  # noqa: E402
from fastapi import FastAPI, Request, Response  # noqa: E402

from csmf.bundle import load_bundle  # noqa: E402
from csmf.weights import DEFAULT_WEIGHTS  # noqa: E402  (the service's `default` scenario)

faiss.omp_set_num_threads(1)
S = SimpleNamespace()  # what the startup hook loads: the bundle and per-item response dicts


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Loaded after the worker is up (as the service does): uvicorn's supervisor restarts a worker
    # that does not answer its health check within 5 s, and a 1M-item load takes longer.
    S.bundle = load_bundle(os.environ["HANDWRITTEN_BUNDLE"], verify=False)
    ids = S.bundle.item_ids.tolist()
    meta = {c: list(v) for c, v in S.bundle.item_meta.items()}
    S.rows_of = {iid: r for r, iid in enumerate(ids)}
    S.items_of = [
        {"item_id": i, "meta": {c: v[r] for c, v in meta.items()}} for r, i in enumerate(ids)
    ]
    yield


app = FastAPI(lifespan=lifespan)


def top_k(req: dict, bundle, rows_of: dict) -> tuple[list[float], list[tuple[int, float]]]:
    """The weights and the (index row, score) results of one decoded request body, as the service
    computes them (the floor endpoint, bench/serve_floor.py, answers with this too)."""
    k = req.get("k", 50)
    w = req.get("weights")
    w = [w[o] for o in bundle.objectives] if isinstance(w, dict) else (w or DEFAULT_WEIGHTS)
    uid = req.get("user_id")
    got = bundle.users.get(uid) if uid is not None else None
    row, stored = got if got else ({"user_id": uid}, [])
    hist = req.get("history")
    if hist is None:  # the stored history: item codes, with their index rows precomputed
        hist, seen = stored, set(stored.rows().tolist()) if stored else set()
    else:
        hist = [h for h in hist if h in rows_of]
        seen = {rows_of[h] for h in hist}
    e = bundle.encoder.encode([row], [hist]) if got or hist else bundle.encoder.cold_start()
    if not req.get("exclude_seen", True):
        seen = set()
    seen.update(rows_of[x] for x in req.get("exclude", ()) if x in rows_of)
    scores, rows = bundle.search(e.reshape(1, -1) * bundle.scale(w), k + len(seen))
    keep = [
        (r, s)
        for r, s in zip(rows[0].tolist(), scores[0].tolist(), strict=True)
        if r >= 0 and r not in seen
    ]
    return w, keep[:k]


@app.post("/v1/retrieve")
async def retrieve(request: Request) -> Response:
    bundle = S.bundle
    w, keep = top_k(orjson.loads(await request.body()), bundle, S.rows_of)
    items = [{**S.items_of[r], "score": s} for r, s in keep]
    out = {"items": items, "weights": dict(zip(bundle.objectives, w, strict=True))}
    out["model_version"] = bundle.model_version
    return Response(orjson.dumps(out), media_type="application/json")


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ok", "model_version": S.bundle.model_version}


if __name__ == "__main__":
    from serve_bare import run

    os.environ["HANDWRITTEN_BUNDLE"] = sys.argv[1]  # the workers' lifespan reads it
    run("serve_handwritten:app", int(sys.argv[2]), int(sys.argv[3]))
