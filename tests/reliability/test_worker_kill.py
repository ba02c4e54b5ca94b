"""A worker SIGKILLed under load: `csmf serve --workers 2` (uvicorn's supervisor), one worker killed
by pid while six clients send varied requests — and, to make it harder, while its scenario store
is degraded (the scenarios file was made unreadable just before; it is restored after the kill).

Asserted: the supervisor starts a replacement (a new pid; two workers again) that answers
requests; the only requests that fail are ones in flight on the killed worker when it died (at
most one per client, since each client has one request in flight at a time, and none sent after
the supervisor reaped it); scenarios are intact afterwards (same weights and versions
everywhere); the replacement serves the bundle the server had been reloaded to, not the one on
the command line (it follows the reload announcement at startup); and the instance reports its
store up again (``csmf_store_up 1``) although the killed worker's last value was 0 — SIGKILL runs
no exit hook, so /metrics must drop the live gauges of dead workers itself (service/metrics.py).
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from fixtures.load import (
    Load,
    failures,
    metrics_dir,
    summary,
    varied_bodies,
    worker_pids,
    worker_sample,
)
from fixtures.services import AUTH
from fixtures.waiting import PATIENCE, wait_until

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
    workers = wait_until(
        lambda: (w := worker_pids(svc.proc.pid)) and len(w) == 2 and w, PATIENCE, "2 workers"
    )

    def served_versions(n: int = 10) -> set:
        return {fresh.post("/v1/retrieve", json={"user_id": "u1"}).json()["model_version"]
                for _ in range(n)}  # fmt: skip

    wait_until(lambda: served_versions() == {version}, PATIENCE, "both workers on the new bundle")

    scenarios = svc.log.parent / "scenarios.json"
    good = scenarios.read_bytes()
    load = Load(svc.url, varied_bodies(("default", "promo")), clients=CLIENTS).start()
    try:
        load.wait_for(60)
        scenarios.write_text("{ not json")  # every worker: degraded, serving from memory
        wait_until(lambda: all(_store_up_of(p) == 0 for p in workers), PATIENCE, "workers degraded")
        victim = workers[0]
        inflight = load.inflight
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        scenarios.write_bytes(good)  # the store recovers; the dead worker's last value was 0
        (replacement,) = set(
            wait_until(
                lambda: (w := worker_pids(svc.proc.pid)) and len(w) == 2 and victim not in w and w,
                PATIENCE,
                "the supervisor to start a replacement",
            )
        ) - set(workers)
        t_replaced = time.monotonic()
        t_serving = _wait_serving(fresh, replacement) - t_kill
        load.wait_more(60)  # load keeps running with the replacement in
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
    now = worker_pids(svc.proc.pid)
    wait_until(lambda: all(_store_up_of(p) == 1 for p in now), PATIENCE, "live workers up")
    assert all(_store_up(fresh) == 1 for _ in range(6))  # whichever worker answers the scrape
    fresh.close()

    counts = summary(samples)
    failed = [s for s in samples if s.status != 200]
    assert len(failed) <= CLIENTS, failures(samples)
    # in flight when it died: sent before the supervisor had reaped it (its sockets closed)
    assert all(s.t0 < t_replaced for s in failed), [(s.t0 - t_kill, s.error) for s in failed]
    assert all(s.status == -1 for s in failed), failures(samples)  # dropped connections, no 5xx
    after = [s for s in samples if s.t0 > t_replaced]
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
            "requests sent after the replacement was started": len(after),
            "failed among them": sum(s.status != 200 for s in after),
            "replacement worker started (new pid) after the kill": f"{t_replaced - t_kill:.2f} s",
            "replacement answering requests after the kill": f"{t_serving:.2f} s",
            "scenarios after the restart": "intact (same weights and version on every worker)",
            "bundle served by the replacement": "the reloaded one (follows the announcement)",
            "killed while degraded: csmf_store_up back to 1 after recovery": "yes",
        },
        "A failed request is one that was in flight on the killed worker (its connection is "
        "dropped: a transport error, never a 5xx); clients reconnect to the surviving worker "
        "while the supervisor (polling every 0.5 s) starts the replacement.",
    )


def _store_up(c: httpx.Client) -> float:
    key = 'csmf_store_up{store="weights"}'
    text = c.get("/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


def _wait_serving(fresh: httpx.Client, pid: int) -> float:
    """Send fresh-connection requests until worker ``pid`` has answered one (its own request
    counter, read from its multiprocess file); the monotonic time it first had."""
    folder = metrics_dir(pid)

    def served() -> bool:
        fresh.post("/v1/retrieve", json={"user_id": "u3"})
        n = worker_sample(folder, pid, "histogram", "csmf_http_request_duration_seconds_count",
                          route="/v1/retrieve", status="200")  # fmt: skip
        return bool(n)

    wait_until(served, PATIENCE, f"worker {pid} to answer requests", interval=0.01)
    return time.monotonic()


def _store_up_of(pid: int) -> float | None:
    return worker_sample(metrics_dir(pid), pid, "gauge_livemin", "csmf_store_up", store="weights")
