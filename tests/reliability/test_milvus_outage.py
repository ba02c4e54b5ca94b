"""The Milvus server killed under load: a `csmf serve` replica serves a bundle whose index is a
collection on the session's real Milvus 2.3 server (tests/fixtures/milvus.py), which is
SIGKILLed by pid mid-load and restarted on the same data folder.

Asserted: while it is down every retrieve answers a 503 that names Milvus (never a 500, never a
hang past the load's timeout), /readyz says "degraded" with the index "down" and why; after the
restart the service recovers by itself (/readyz ok, retrieves 200) and answers every request
exactly as before the kill (same items, same scores: nothing lost). How long each step took is
measured and reported, not asserted.
"""

from __future__ import annotations

import time

import pytest
from fixtures.load import Load, failures, summary, varied_bodies
from fixtures.waiting import PATIENCE, wait_until

from index_builder.build import build_bundle
from index_builder.config import BuildConfig

pytest.importorskip("pymilvus")
pytestmark = pytest.mark.slow
RESTART_PATIENCE = 180.0  # a restarted Milvus reloads its collections before it answers


def _answers(svc, bodies) -> list:
    out = []
    for path, body in bodies:
        r = svc.client.post(path, json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        results = doc.get("results", [doc])
        out.append([[(it["item_id"], round(it["score"], 4)) for it in d["items"]] for d in results])
    return out


def _index_state(svc) -> dict:
    return svc.client.get("/readyz").json()


def test_milvus_killed_under_load(milvus_server, service_runs, serve, tmp_path, report):
    if not hasattr(milvus_server, "proc"):
        pytest.skip("the Milvus server is external (CSMF_TEST_MILVUS_URI): not ours to kill")
    cfg = BuildConfig(backend="milvus", uri=milvus_server.uri, index="flat", collection="outage")
    bundle, _ = build_bundle(service_runs[0], tmp_path / "bundle", cfg, progress=False)
    svc = serve(bundle)
    bodies = varied_bodies()
    before = _answers(svc, bodies)
    assert _index_state(svc)["index"] == {"backend": "milvus", "state": "ok"}

    load = Load(svc.url, bodies, clients=4).start()
    try:
        load.wait_for(50)
        t_kill = time.monotonic()
        milvus_server.kill()
        ready = wait_until(
            lambda: (r := _index_state(svc))["status"] == "degraded" and r,
            PATIENCE,
            "/readyz to report the index down",
        )
        detected = time.monotonic() - t_kill
        assert ready["index"]["state"] == "down" and "Milvus" in ready["index"]["error"], ready
        r = svc.client.post("/v1/retrieve", json={"user_id": "u1", "k": 5})
        assert r.status_code == 503, r.text
        assert "Milvus" in r.json()["detail"] and milvus_server.uri in r.json()["detail"]
        load.wait_more(20)  # the load runs on through the outage
        t_restart = time.monotonic()
        milvus_server.start()
        engine_ready = milvus_server.wait_ready(RESTART_PATIENCE)
        wait_until(
            lambda: _index_state(svc)["status"] == "ok", RESTART_PATIENCE, "/readyz ok again"
        )
        wait_until(
            lambda: svc.client.post("/v1/retrieve", json={"user_id": "u1"}).status_code == 200,
            RESTART_PATIENCE,
            "retrieve to answer again",
        )
        recovered = time.monotonic() - t_restart
        load.wait_more(50)
    finally:
        samples = load.stop()
    assert _answers(svc, bodies) == before  # the same collection, nothing lost
    codes = {s.status for s in samples}
    assert codes <= {200, 503}, failures(samples)  # never a 500, a transport error or a hang
    down = [s for s in samples if s.status == 503]
    assert down and all("Milvus" in (s.error or "") for s in down), failures(samples)
    after = [s for s in samples if s.t0 > t_restart + recovered]
    assert after and all(s.status == 200 for s in after), failures(after)
    counts = summary(samples)
    slowest_503 = max(s.t1 - s.t0 for s in down)
    report.add(
        "Milvus server killed under load",
        {
            "replica (`csmf serve`, 1 worker)": 1,
            "engine": "Milvus 2.3.5 standalone (embedded etcd), one FLAT collection",
            "load": f"4 async clients, {len(bodies)} varied bodies (single + batch)",
            "requests sent": counts["sent"],
            "answered 503 while Milvus was down": len(down),
            "other failures": counts["failed"] - len(down),
            "slowest 503": f"{slowest_503:.2f} s",
            "outage reported (/readyz degraded) after the kill": f"{detected:.2f} s",
            "Milvus ready (a search succeeds) after the restart": f"{engine_ready:.1f} s",
            "service answering again after the restart": f"{recovered:.1f} s",
            "answers after recovery equal those before the kill": f"{len(bodies)} of {len(bodies)}",
        },
        "SIGKILL by pid, restart on the same data folder. A refused connection, or a Milvus "
        "search not answered within its timeout (csmf/index/milvus.py SEARCH_TIMEOUT_S), is "
        "a 503 naming the engine.",
    )
