"""A worker SIGKILLed under load: `csmf serve --workers 2` (uvicorn's supervisor), one worker killed
by pid while six clients send varied requests.

Asserted: the supervisor starts a replacement (a new pid; two workers again); the only requests
that fail are ones in flight on the killed worker when it died (at most one per client, since each
client has one request in flight at a time, and none sent after the kill was observed); scenarios
are intact afterwards; and the replacement serves the bundle the server had been reloaded to, not
the one on the command line (it follows the reload announcement at startup).
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from fixtures.load import Load, failures, summary, varied_bodies, worker_pids
from fixtures.services import AUTH, wait_until

pytestmark = pytest.mark.slow
PROMO = {"exposure": 0.2, "click": 1.0, "conversion": 4.0}
CLIENTS = 6


def test_worker_killed_under_load(serve, bundles, report):
    svc = serve(bundles["flat"], workers=2)
    fresh = httpx.Client(
        base_url=svc.url, timeout=30, headers=AUTH, limits=httpx.Limits(max_keepalive_connections=0)
    )
    r = fresh.put("/admin/scenarios/promo", json={"weights": PROMO})
    assert r.status_code == 200, r.text
    promo_version = r.json()["version"]
    r = fresh.post("/admin/reload", json={"bundle": str(bundles["other"])})
    assert r.status_code == 200, r.text
    version = r.json()["bundle"]["model_version"]
    workers = wait_until(lambda: (w := worker_pids(svc.proc.pid)) and len(w) == 2 and w, 10, "2")

    def served_versions(n: int = 10) -> set:
        return {fresh.post("/v1/retrieve", json={"user_id": "u1"}).json()["model_version"]
                for _ in range(n)}  # fmt: skip

    wait_until(lambda: served_versions() == {version}, 5.0, "both workers on the new bundle")

    load = Load(svc.url, varied_bodies(("default", "promo")), clients=CLIENTS).start()
    try:
        load.wait_for(60)
        victim = workers[0]
        inflight = load.inflight
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (w := worker_pids(svc.proc.pid)) and len(w) == 2 and victim not in w and w,
            15.0,
            "the supervisor to replace the killed worker",
        )
        t_replaced = time.monotonic()
        # the replacement is serving once a burst of fresh connections all succeed
        wait_until(
            lambda: all(
                fresh.post("/v1/retrieve", json={"user_id": "u2"}).status_code == 200
                for _ in range(6)
            ),
            20.0,
            "the server to answer every fresh connection",
        )
        t_serving = time.monotonic()
        time.sleep(1.0)  # load keeps running across the replacement
    finally:
        samples = load.stop()
    # after: scenarios intact and the reloaded bundle everywhere, the replacement included
    for _ in range(10):
        listed = {s["name"]: s for s in fresh.get("/admin/scenarios").json()["scenarios"]}
        assert listed["promo"]["weights"] == PROMO and listed["promo"]["version"] == promo_version
        r = fresh.post("/v1/retrieve", json={"user_id": "u1", "scenario": "promo"})
        assert r.status_code == 200 and r.json()["weights"] == PROMO, r.text
        assert r.json()["model_version"] == version
    assert served_versions(20) == {version}
    fresh.close()

    counts = summary(samples)
    failed = [s for s in samples if s.status != 200]
    assert len(failed) <= CLIENTS, failures(samples)
    assert all(s.t0 < t_kill + 0.5 for s in failed), [(s.t0 - t_kill, s.error) for s in failed]
    assert all(s.status == -1 for s in failed), failures(samples)  # dropped connections, no 5xx
    after = [s for s in samples if s.t0 > t_kill + 0.5]
    assert len(after) > 20 and all(s.status == 200 for s in after)
    assert counts["sent"] > 100, counts
    report.add(
        "Worker killed under load",
        {
            "server": "`csmf serve --workers 2` (uvicorn supervisor)",
            "load": f"{CLIENTS} async clients, 44 varied bodies",
            "requests sent": counts["sent"],
            "requests in flight (all workers) when the worker was killed": inflight,
            "failed requests": f"{len(failed)} ({', '.join(sorted(failures(samples))) or '-'})",
            "requests sent after the kill": len(after),
            "failed among them": sum(s.status != 200 for s in after),
            "replacement worker started (new pid) after the kill": f"{t_replaced - t_kill:.2f} s",
            "every fresh connection answered again after the kill": f"{t_serving - t_kill:.2f} s",
            "scenarios after the restart": "intact (same weights and version on every worker)",
            "bundle served by the replacement": "the reloaded one (follows the announcement)",
        },
        "A failed request is one that was in flight on the killed worker (its connection is "
        "dropped: a transport error, never a 5xx); clients reconnect to the surviving worker "
        "while the supervisor (polling every 0.5 s) starts the replacement.",
    )
