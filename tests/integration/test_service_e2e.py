"""End to end: real `csmf serve` processes (uvicorn on loopback) and real Redis servers."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fixtures.services import AUTH, REDIS_URL, wait_until

pytestmark = pytest.mark.slow
PROMO = {"exposure": 0.2, "click": 1.0, "conversion": 4.0}


def _weights_seen(svc, scenario: str):
    r = svc.client.post("/v1/retrieve", json={"user_id": "u1", "k": 3, "scenario": scenario})
    return r.json()["weights"] if r.status_code == 200 else None


def test_two_replicas_sharing_redis_see_a_change_within_a_second(serve, bundles, redis_prefix):
    env = {
        "CSMF_REDIS_URL": REDIS_URL,
        "CSMF_REDIS_PREFIX": redis_prefix,
        "CSMF_SYNC_INTERVAL_S": "0.25",
    }
    a, b = serve(bundles["flat"], **env), serve(bundles["flat"], **env)
    assert a.client.put("/admin/scenarios/promo", json={"weights": PROMO}).status_code == 401
    last = 0
    for i in range(3):
        weights = {**PROMO, "exposure": float(i)}
        t0 = time.monotonic()
        r = a.client.put("/admin/scenarios/promo", json={"weights": weights}, headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] > last, r.text
        last = r.json()["version"]
        wait_until(
            lambda w=weights: _weights_seen(b, "promo") == w,
            1.0,
            "replica b to use the new weights",
        )
        assert time.monotonic() - t0 < 1.0
    ready = b.client.get("/readyz").json()
    assert ready["status"] == "ok" and ready["weight_store"]["backend"] == "redis"


def test_scenarios_survive_an_empty_redis_restart_racing_a_retried_put(
    serve, bundles, redis_server
):
    """End to end: kill -9 Redis, restart it empty, and immediately PUT another scenario
    through the other replica, retrying its 503s as a client would. Nothing either replica knew
    is lost, on either replica or in Redis."""
    env = {"CSMF_REDIS_URL": redis_server.url, "CSMF_REDIS_PREFIX": "e2e:"}
    env |= {"CSMF_SYNC_INTERVAL_S": "0.25", "CSMF_REDIS_TIMEOUT_S": "0.3"}
    a, b = serve(bundles["flat"], **env), serve(bundles["flat"], **env)
    kept = {"keepme": PROMO, "keepme2": {**PROMO, "click": 3.0}}
    for name, weights in kept.items():
        r = a.client.put(f"/admin/scenarios/{name}", json={"weights": weights}, headers=AUTH)
        assert r.status_code == 200, r.text
    wait_until(lambda: _weights_seen(b, "keepme2") == kept["keepme2"], 1.0, "b to see keepme2")
    redis_server.kill()
    redis_server.start()
    new = {"exposure": 1.0, "click": 0.0, "conversion": 0.0}
    end = time.monotonic() + 5
    while (r := b.client.put("/admin/scenarios/new", json={"weights": new}, headers=AUTH)) and (
        r.status_code == 503 and time.monotonic() < end
    ):
        time.sleep(0.02)
    assert r.status_code == 200, r.text
    want = {**kept, "new": new}
    for svc in (a, b):
        for name, weights in want.items():
            wait_until(lambda s=svc, n=name, w=weights: _weights_seen(s, n) == w, 3.0, name)
        names = [
            s["name"] for s in svc.client.get("/admin/scenarios", headers=AUTH).json()["scenarios"]
        ]
        assert names == ["default", "keepme", "keepme2", "new"]


def test_workers_share_metrics_and_reloads(serve, bundles):
    svc = serve(bundles["flat"], workers=2)
    fresh = httpx.Client(
        base_url=svc.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    )
    n = 40
    for i in range(n):
        assert fresh.post("/v1/retrieve", json={"user_id": f"u{i}", "k": 5}).status_code == 200
    key = 'csmf_http_request_duration_seconds_count{route="/v1/retrieve",status="200"}'

    def count(text: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))

    # whichever worker answers the scrape, it reports both workers' requests
    assert {count(fresh.get("/metrics").text) for _ in range(6)} == {n}
    before = fresh.get("/admin/bundle", headers=AUTH).json()["model_version"]
    codes: list[int] = []
    stop = threading.Event()

    def traffic():  # requests keep succeeding while the bundle is swapped under them
        with httpx.Client(base_url=svc.url, timeout=10) as c:
            while not stop.is_set():
                codes.append(c.post("/v1/retrieve", json={"user_id": "u2", "k": 5}).status_code)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        r = fresh.post("/admin/reload", json={"bundle": str(bundles["other"])}, headers=AUTH)
        assert r.status_code == 200, r.text
        after = r.json()["bundle"]["model_version"]
        assert after != before
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert codes and set(codes) == {200}

    def all_new() -> bool:
        versions = {
            fresh.post("/v1/retrieve", json={"user_id": "u1"}).json()["model_version"]
            for _ in range(8)
        }
        return versions == {after}

    wait_until(all_new, 5.0, "every worker to serve the reloaded bundle")
    fresh.close()
