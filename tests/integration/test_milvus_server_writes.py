"""Item writes through the service on a bundle served by the session's real Milvus 2.3 server
(tests/fixtures/milvus.py): `PUT` and `DELETE /admin/items` on a `csmf serve` behind a real
uvicorn, and the same writes on an in-process service over FAISS Flat of the same run — the
reference, exact.

Asserted: written items (cold ones encoded from their features, others with given vectors) are
served with the exact weighted score and the same ranking as the reference; a response to a
request sent after a delete's 200 never holds the deleted item (readers running throughout);
SIGKILLed and restarted, the service replays its log onto the collection (idempotently) and
answers as before, including a write the CLI made while it was down.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures.services import AUTH
from fixtures.waiting import PATIENCE, wait_until

from csmf.bundle import load_bundle, read_manifest
from index_builder.build import build_bundle
from index_builder.config import BuildConfig

pytest.importorskip("pymilvus")
pytestmark = pytest.mark.slow
WEIGHTS = {"exposure": 0.5, "click": 2.0, "conversion": 1.5}
USER = "u3"


def _aimed(ref, i: int, genre: str = "drama") -> dict:
    """An item whose vector points along USER's weighted query: near the top of their list."""
    row, hist = ref.users.get(USER)
    q = ref.encoder.encode([row], [hist])[0] * ref.scale(WEIGHTS)
    v = q / np.linalg.norm(q) * (3 + i) + np.random.default_rng(i).normal(0, 0.1, ref.dim)
    return {"item_id": f"aimed-{i}", "genre": genre, "price": 5.0, "vector": v.tolist()}


def _ranked(client, body) -> list[tuple[str, float]]:
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    return [(i["item_id"], i["score"]) for i in r.json()["items"]]


def _same(got, want) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4, atol=1e-4)


class Readers(threading.Thread):
    """Retrieves on fresh connections, logging (time sent, item ids)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.log, self.errors, self.stop = url, [], [], threading.Event()

    def run(self) -> None:
        body = {"user_id": USER, "k": 20, "weights": WEIGHTS, "exclude_seen": False}
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = httpx.post(f"{self.url}/v1/retrieve", json=body, timeout=30)
                r.raise_for_status()
                self.log.append((sent, {i["item_id"] for i in r.json()["items"]}))
            except Exception as exc:  # reported by the test
                self.errors.append(exc)


def test_item_writes_through_the_service_on_a_milvus_server(
    milvus_server, service_runs, bundles, serve, make_client, tmp_path
):
    cfg = BuildConfig(backend="milvus", uri=milvus_server.uri, index="flat", collection="writes")
    bundle, _ = build_bundle(service_runs[0], tmp_path / "bundle", cfg, progress=False)
    flat = tmp_path / "flat"
    shutil.copytree(bundles["flat"], flat)
    ref_b = load_bundle(flat)
    ref = make_client(flat)  # FAISS Flat, same run, same writes: the exact reference
    svc = serve(bundle)
    admin = httpx.Client(base_url=svc.url, timeout=60, headers=AUTH)
    rows = pq.read_table(read_manifest(flat).source["items"]).to_pylist()[:12]
    cold = [{**r, "item_id": f"cold-{i}", "genre": "drama"} for i, r in enumerate(rows[:8])]
    items = cold + [_aimed(ref_b, i, g) for i, g in enumerate(["drama", "comedy", "drama"])]
    for client in (admin, ref):
        r = client.put("/admin/items", json={"items": items}, headers=AUTH)
        assert r.status_code == 200 and r.json()["seq"] == 1, r.text
    bodies = [
        {"user_id": USER, "k": 30, "weights": WEIGHTS, "exclude_seen": False},
        {"user_id": "u7", "k": 20, "weights": WEIGHTS, "filter": {"field": "genre", "eq": "drama"}},
        {"history": ["i1", "i9"], "k": 15, "exclude": ["aimed-0"]},
    ]
    for body in bodies:
        _same(_ranked(svc.client, body), _ranked(ref, body))
    top = _ranked(svc.client, bodies[0])
    assert top[0][0] == "aimed-2"
    row, hist = ref_b.users.get(USER)  # the exact weighted score of a written vector
    q = ref_b.encoder.encode([row], [hist])[0] * ref_b.scale(WEIGHTS)
    want = float(np.asarray(items[-1]["vector"], np.float32) @ q)
    assert top[0][1] == pytest.approx(want, rel=1e-5)

    readers = Readers(svc.url)
    readers.start()
    try:
        deleted = {}
        for gone in (["aimed-2", "cold-1"], ["aimed-1", "i5", "never-there"]):
            for client in (admin, ref):
                r = client.request("DELETE", "/admin/items", json={"ids": gone}, headers=AUTH)
                assert r.status_code == 200, r.text
            deleted.update(dict.fromkeys(gone, time.monotonic()))
            assert not set(gone) & {i for i, _ in _ranked(svc.client, bodies[0])}
        n = len(readers.log)
        wait_until(lambda: len(readers.log) >= n + 20 or readers.errors, PATIENCE, "more reads")
    finally:
        readers.stop.set()
        readers.join()
    assert not readers.errors, readers.errors[:3]
    stale = [(t, ids & set(deleted)) for t, ids in readers.log
             if any(t > deleted[i] for i in ids & set(deleted))]  # fmt: skip
    assert not stale, f"deleted items served after their delete was acknowledged: {stale[:3]}"
    before = [_ranked(svc.client, b) for b in bodies]
    for body, got in zip(bodies, before, strict=True):
        _same(got, _ranked(ref, body))

    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(10)
    late = tmp_path / "late.jsonl"  # written while the service is down: the log, then Milvus
    late.write_text(json.dumps(_aimed(ref_b, 7, "docu")) + "\n")
    p = subprocess.run([sys.executable, "-m", "csmf.cli", "index", "upsert", str(bundle),
                        str(late)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    again = serve(bundle)  # replays records 1-4 onto the collection: idempotent
    assert again.client.get("/admin/bundle", headers=AUTH).json()["item_log"]["applied_seq"] == 4
    ref.put("/admin/items", json={"items": [_aimed(ref_b, 7, "docu")]}, headers=AUTH)
    for body in bodies:
        _same(_ranked(again.client, body), _ranked(ref, body))
    assert _ranked(again.client, bodies[0])[0][0] == "aimed-7"
