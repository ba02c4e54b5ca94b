"""End to end: real `csmf serve` processes (uvicorn on loopback) and real Redis servers."""

from __future__ import annotations

import threading

import httpx
import pytest
from fixtures.services import AUTH, REDIS_URL
from fixtures.waiting import PATIENCE, wait_until

pytestmark = pytest.mark.slow
PROMO = {"exposure": 0.2, "click": 1.0, "conversion": 4.0}


def _weights_seen(svc, scenario: str):
    r = svc.client.post("/v1/retrieve", json={"user_id": "u1", "k": 3, "scenario": scenario})
    return r.json()["weights"] if r.status_code == 200 else None


def test_two_replicas_sharing_redis_see_every_change(serve, bundles, redis_prefix):
    """A change through one replica's admin API is served by the other (Redis pub/sub wakes its
    sync at once; how long it takes under load is in bench/results/reliability.md)."""
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
        r = a.client.put("/admin/scenarios/promo", json={"weights": weights}, headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] > last, r.text
        last = r.json()["version"]
        wait_until(
            lambda w=weights: _weights_seen(b, "promo") == w,
            PATIENCE,
            f"replica b to use the weights of version {last}",
        )
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
    wait_until(lambda: _weights_seen(b, "keepme2") == kept["keepme2"], PATIENCE, "b to see keepme2")
    redis_server.kill()
    redis_server.start()
    new = {"exposure": 1.0, "click": 0.0, "conversion": 0.0}

    def put_new():  # retried while Redis is unavailable (503), as a client would
        r = b.client.put("/admin/scenarios/new", json={"weights": new}, headers=AUTH)
        return None if r.status_code == 503 else r

    r = wait_until(put_new, PATIENCE, "a PUT through b that is not a 503")
    assert r.status_code == 200, r.text
    want = {**kept, "new": new}
    for svc in (a, b):
        for name, weights in want.items():
            wait_until(lambda s=svc, n=name, w=weights: _weights_seen(s, n) == w, PATIENCE, name)
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
        wait_until(lambda: len(codes) >= 20, PATIENCE, "20 requests before the reload")
        r = fresh.post("/admin/reload", json={"bundle": str(bundles["other"])}, headers=AUTH)
        assert r.status_code == 200, r.text
        after = r.json()["bundle"]["model_version"]
        assert after != before
        n_reloaded = len(codes)
        wait_until(lambda: len(codes) >= n_reloaded + 50, PATIENCE, "50 requests after it")
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

    wait_until(all_new, PATIENCE, "every worker to serve the reloaded bundle")
    fresh.close()
