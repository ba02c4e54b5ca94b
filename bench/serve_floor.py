"""The "floor endpoint" of bench/serve.py: the least a Python server on the service's stack can
do per request and still return the service's results.

uvicorn (httptools, as the service) calls one bare ASGI function: no framework, no middleware,
no validation, no metrics, no request id. It reads the body with ``orjson``, looks the user up,
encodes and searches exactly as bench/serve_handwritten.py does (same bodies, same results), and
renders the items with the service's own pre-serialised item JSON (service/item_json.py, the
cheapest rendering measured). Its CPU per request, in the same rounds as the others, is what
bare HTTP + encode + search costs when they run inside one real request — the cache misses each
step inflicts on the next included — so the service's ratio to it is the price of everything the
service adds, and the floor's own ratio to ``bare + interleaved encode+search`` is how far that
sum, measured in pieces, sits below anything that serves. Run with ``--workers`` like the service:
``python serve_floor.py BUNDLE PORT WORKERS``.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import faiss  # noqa: E402
import orjson  # noqa: E402
from serve_handwritten import top_k  # noqa: E402  (the same lookup, encode and search)

from csmf.bundle import load_bundle  # noqa: E402
from service.item_json import ItemJson  # noqa: E402

S = SimpleNamespace(bundle=None)
HEADERS = [(b"content-type", b"application/json")]


def _load() -> None:
    faiss.omp_set_num_threads(1)
    S.bundle = b = load_bundle(os.environ["FLOOR_BUNDLE"], verify=False)
    ids = b.item_ids.tolist()
    S.rows_of = {iid: r for r, iid in enumerate(ids)}
    S.items = ItemJson(ids, b.item_meta)
    S.tail = b',"model_version":' + orjson.dumps(b.model_version) + b"}"


def retrieve(body: bytes) -> bytes:
    bundle = S.bundle
    w, keep = top_k(orjson.loads(body), bundle, S.rows_of)
    items = S.items.render([r for r, _ in keep], [s for _, s in keep])
    weights = orjson.dumps(dict(zip(bundle.objectives, w, strict=True)))
    return b'{"items":' + items + b',"weights":' + weights + S.tail


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _load()  # after the worker is up, as the service loads (see serve_handwritten)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/v1/retrieve":
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        payload = retrieve(b"".join(chunks))
    else:  # /readyz
        payload = orjson.dumps({"status": "ok", "model_version": S.bundle.model_version})
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    from serve_bare import run

    os.environ["FLOOR_BUNDLE"] = sys.argv[1]  # the workers' lifespan reads it
    run("serve_floor:app", int(sys.argv[2]), int(sys.argv[3]))
