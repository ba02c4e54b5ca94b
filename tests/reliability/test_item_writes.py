"""Item writes across real processes: three replicas (`csmf serve --workers 2` and a second
`csmf serve`, one bundle, one Redis) under read load while items are added and deleted through
the admin API and the CLI; a server SIGKILLed in the middle of a stream of write batches; and
the log truncated only once every replica serves the compacted bundle.

Asserted: an acknowledged upsert is served by every replica at once (fresh connections to every
server right after the 200); a response to a request sent after a delete's 200 never holds the
deleted item, on any replica; CLI writes (no acknowledgement wait) reach every replica through
the log; after the kill, every acknowledged batch is served whole after a restart, and the batch
in flight is served whole or not at all. The time writes take to be acknowledged and to reach
the replicas is reported, not asserted.
"""

from __future__ import annotations

import json
import os
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
from fixtures.load import Load, failures, summary, varied_bodies
from fixtures.services import AUTH, REDIS_URL
from fixtures.waiting import PATIENCE, wait_until

from csmf.bundle import load_bundle, read_manifest
from csmf.catalogue import Catalogue
from csmf.item_log import ItemLog

pytestmark = pytest.mark.slow
USER = "u3"
DEFAULT = {"exposure": 1.0, "click": 1.8, "conversion": 1.2}  # the `default` scenario


def _aimed(path, user: str, i: int) -> dict:
    """An item whose vector points along the user's default-weighted query: their top item."""
    b = load_bundle(path)
    row, hist = b.users.get(user)
    q = b.encoder.encode([row], [hist])[0] * b.scale(DEFAULT)
    return {"item_id": f"aimed-{i}", "genre": "drama", "price": 1.0,
            "vector": (q / np.linalg.norm(q) * 100).tolist()}  # fmt: skip


def _top(url: str) -> str | None:
    with httpx.Client(base_url=url, timeout=30) as c:  # a fresh connection: any worker
        r = c.post("/v1/retrieve", json={"user_id": USER, "k": 3, "exclude_seen": False})
        r.raise_for_status()
        items = r.json()["items"]
        return items[0]["item_id"] if items else None


class Readers:
    """Threads sending retrieves on fresh connections to every server, logging (sent, top)."""

    def __init__(self, urls: list[str], n: int = 3) -> None:
        self.urls, self.log, self.errors = urls, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        k = i
        while not self._stop.is_set():
            url = self.urls[k % len(self.urls)]
            k += 1
            sent = time.monotonic()
            try:
                self.log.append((sent, url, _top(url)))
            except Exception as exc:  # reported by the test
                self.errors.append(exc)

    def __enter__(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def test_replicas_see_every_acknowledged_write(serve, bundles, redis_prefix, tmp_path, report):
    path = tmp_path / "b"
    shutil.copytree(bundles["flat"], path)
    env = {"CSMF_REDIS_URL": REDIS_URL, "CSMF_REDIS_PREFIX": redis_prefix}
    a = serve(path, workers=2, **env)
    b = serve(path, workers=1, **env)
    import redis

    rc = redis.Redis.from_url(REDIS_URL)
    alive = f"{redis_prefix}items:b.items.log:alive"
    wait_until(lambda: rc.zcard(alive) >= 3, PATIENCE, "three replicas heartbeating")
    urls = [a.url, b.url]
    admin = [httpx.Client(base_url=u, timeout=30, headers=AUTH) for u in urls]
    acks, deletes = [], {}
    with Readers(urls) as readers:
        for i in range(4):
            w = admin[i % 2]
            t0 = time.monotonic()
            r = w.put("/admin/items", json={"items": [_aimed(path, USER, i)]})
            assert r.status_code == 200, r.text
            acks.append(time.monotonic() - t0)
            for url in urls * 4:  # both servers, several fresh connections: every worker
                assert _top(url) == f"aimed-{i}", url
            t0 = time.monotonic()
            r = w.request("DELETE", "/admin/items", json={"ids": [f"aimed-{i}"]})
            assert r.status_code == 200 and r.json()["written"] == [f"aimed-{i}"], r.text
            deletes[f"aimed-{i}"] = time.monotonic()
            acks.append(deletes[f"aimed-{i}"] - t0)
            for url in urls * 4:
                assert _top(url) != f"aimed-{i}", url
        # the CLI writes the log without waiting: replicas follow it within their sync interval
        cli = tmp_path / "cli.jsonl"
        cli.write_text(json.dumps(_aimed(path, USER, 9)) + "\n")
        p = subprocess.run([sys.executable, "-m", "csmf.cli", "index", "upsert", str(path),
                            str(cli)], capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 0, p.stderr
        t0 = time.monotonic()  # the record is durable: from here the replicas must follow it
        wait_until(
            lambda: all(_top(u) == "aimed-9" for u in urls * 3), PATIENCE, "CLI write everywhere"
        )
        cli_visible = time.monotonic() - t0
    assert not readers.errors, readers.errors[:3]
    stale = [(url, top) for sent, url, top in readers.log if top in deletes and sent > deletes[top]]
    assert not stale, f"deleted items served after their delete was acknowledged: {stale[:5]}"
    report.add(
        "Item writes across three replicas (Redis carries the log position)",
        {
            "reads during writes": len(readers.log),
            "write acknowledged (all replicas applied), median / max ms":
                f"{np.median(acks) * 1000:.0f} / {max(acks) * 1000:.0f}",
            "CLI upsert done → served by every replica, s": f"{cli_visible:.2f}",
            "responses holding an item after its delete was acknowledged": len(stale),
        },
    )  # fmt: skip


def _batch(rows: list[dict], i: int, n: int) -> list[dict]:
    return [
        {**rows[j % len(rows)], "item_id": f"b{i}-{j}", "genre": f"batch-{i}"} for j in range(n)
    ]


def test_a_server_killed_mid_write_loses_no_acknowledged_item(serve, bundles, tmp_path, report):
    path = tmp_path / "b"
    shutil.copytree(bundles["flat"], path)
    svc = serve(path, workers=1)
    rows = pq.read_table(read_manifest(path).source["items"]).to_pylist()[:50]
    size = 40
    acked: list[int] = []
    state = {"inflight": None}

    def writer() -> None:
        with httpx.Client(base_url=svc.url, timeout=30, headers=AUTH) as c:
            for i in range(10_000):
                state["inflight"] = i
                try:
                    r = c.put("/admin/items", json={"items": _batch(rows, i, size)})
                except httpx.HTTPError:
                    return  # the server died under this request
                assert r.status_code == 200, r.text
                acked.append(i)

    t = threading.Thread(target=writer)
    t.start()
    wait_until(lambda: len(acked) >= 5, PATIENCE, "five acknowledged batches")
    os.kill(svc.proc.pid, signal.SIGKILL)
    t.join()
    inflight = state["inflight"]
    assert inflight not in acked
    log = path.parent / "b.items.log"
    size_at_kill = log.stat().st_size

    again = serve(path, workers=1)  # replays the log at start
    with httpx.Client(base_url=again.url, timeout=30) as c:

        def served(i: int) -> set[str]:
            body = {"user_id": "u1", "k": 500, "exclude_seen": False,
                    "filter": {"field": "genre", "eq": f"batch-{i}"}}  # fmt: skip
            r = c.post("/v1/retrieve", json=body)
            assert r.status_code == 200, r.text
            return {it["item_id"] for it in r.json()["items"]}

        for i in acked:
            assert served(i) == {f"b{i}-{j}" for j in range(size)}, f"batch {i} lost items"
        partial = served(inflight)
        assert len(partial) in (0, size), f"half of batch {inflight} is served: {len(partial)}"
        r = httpx.put(f"{again.url}/admin/items", headers=AUTH, timeout=30,
                      json={"items": _batch(rows, 99_999, 3)})  # fmt: skip
        assert r.status_code == 200, r.text  # the log takes writes again (a torn tail dropped)
    cat = Catalogue(load_bundle(path))
    cat.catch_up()  # the log reads cleanly to its end
    report.add(
        "Server SIGKILLed during a stream of item write batches",
        {
            "batches acknowledged before the kill": len(acked),
            "batch in flight": f"{'served whole' if partial else 'not written'} ({len(partial)} items)",
            "log bytes at the kill": size_at_kill,
            "acknowledged items lost": 0,
        },
    )  # fmt: skip


def test_compaction_swaps_in_under_load_without_a_failed_request(serve, bundles, tmp_path, report):
    path = tmp_path / "b"
    shutil.copytree(bundles["flat"], path)
    svc = serve(path, workers=2, CSMF_TRUNCATE_ITEM_LOG="true")
    admin = httpx.Client(
        base_url=svc.url, timeout=30, headers=AUTH, limits=httpx.Limits(max_keepalive_connections=0)
    )
    rows = pq.read_table(read_manifest(path).source["items"]).to_pylist()[:20]
    cold = [{**r, "item_id": f"cold-{i}"} for i, r in enumerate(rows)]
    r = admin.put("/admin/items", json={"items": [_aimed(path, USER, 0), *cold]})
    assert r.status_code == 200, r.text
    gone = [f"i{j}" for j in range(100, 160)] + ["cold-3"]
    r = admin.request("DELETE", "/admin/items", json={"ids": gone})
    assert r.status_code == 200, r.text
    bodies = varied_bodies()
    probe = {"user_id": USER, "k": 50, "exclude_seen": False}
    before = [i["item_id"] for i in admin.post("/v1/retrieve", json=probe).json()["items"]]
    assert before[0] == "aimed-0" and not set(before) & set(gone)
    load = Load(svc.url, bodies, clients=4).start()
    try:
        load.wait_for(40)
        # in place: the same path and model version, so the other worker follows the
        # announcement by the folded seq it names
        p = subprocess.run([sys.executable, "-m", "csmf.cli", "index", "compact", str(path),
                            "--quiet"], capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["rows_dropped"] == len(gone)
        r = admin.post("/admin/reload", json={"bundle": str(path)})
        assert r.status_code == 200, r.text

        def everywhere() -> bool:  # fresh connections land on either worker
            infos = [admin.get("/admin/bundle").json()["item_log"] for _ in range(8)]
            return all(i["folded_seq"] == 2 for i in infos)

        wait_until(everywhere, PATIENCE, "every worker on the compacted bundle")
        log = ItemLog(path.parent / "b.items.log")  # both workers serve it: records 1-2 go
        wait_until(lambda: log.base() == 2, PATIENCE, "the folded records truncated")
        r = admin.put("/admin/items", json={"items": [_aimed(path, USER, 1)]})
        assert r.status_code == 200, r.text  # a write after the swap lands in the same log
        for _ in range(8):
            assert _top(svc.url) == "aimed-1"
        load.wait_more(40)
    finally:
        samples = load.stop()
    assert failures(samples) == {}, failures(samples)
    r = admin.request("DELETE", "/admin/items", json={"ids": ["aimed-1"]})
    after = [i["item_id"] for i in admin.post("/v1/retrieve", json=probe).json()["items"]]
    assert after == before  # the compacted bundle answers what the written one did
    report.add(
        "Compaction swapped in under load",
        {**summary(samples), "rows dropped": len(gone), "records folded": 2},
    )


def test_the_log_is_truncated_once_every_replica_serves_the_compacted_bundle(
    serve, bundles, redis_prefix, tmp_path, report
):
    path = tmp_path / "b"
    shutil.copytree(bundles["flat"], path)
    env = {"CSMF_REDIS_URL": REDIS_URL, "CSMF_REDIS_PREFIX": redis_prefix,
           "CSMF_TRUNCATE_ITEM_LOG": "true"}  # fmt: skip
    a, b = serve(path, **env), serve(path, **env)
    import redis

    rc = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"{redis_prefix}items:b.items.log"
    wait_until(lambda: rc.zcard(f"{key}:alive") >= 2, PATIENCE, "two replicas heartbeating")
    wa, wb = (httpx.Client(base_url=s.url, timeout=30, headers=AUTH) for s in (a, b))
    assert wa.put("/admin/items", json={"items": [_aimed(path, USER, 0)]}).status_code == 200
    gone = [f"i{j}" for j in range(100, 140)]
    assert wb.request("DELETE", "/admin/items", json={"ids": gone}).status_code == 200
    log = ItemLog(path.parent / "b.items.log")
    size_before = log.size()
    p = subprocess.run([sys.executable, "-m", "csmf.cli", "index", "compact", str(path),
                        "--quiet"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0 and json.loads(p.stdout)["applied_seq"] == 2, p.stderr
    assert wa.post("/admin/reload", json={"bundle": str(path)}).status_code == 200

    def folded() -> dict[str, int]:
        return {r: int(f) for r, f in rc.hgetall(f"{key}:folded").items()}

    wait_until(lambda: 2 in folded().values(), PATIENCE, "replica a heartbeating folded 2")
    first = next(r for r, f in folded().items() if f == 2)
    seen = rc.zscore(f"{key}:alive", first)
    wait_until(lambda: rc.zscore(f"{key}:alive", first) > seen, PATIENCE, "a's next sync")
    assert log.base() == 0  # b serves the bundle as built: it could reload it and replay 1-2
    r = wb.put("/admin/items", json={"items": [_aimed(path, USER, 1)]})  # record 3, b still old
    assert r.status_code == 200 and r.json()["seq"] == 3, r.text
    assert wb.post("/admin/reload", json={"bundle": str(path)}).status_code == 200
    wait_until(lambda: log.base() == 2, PATIENCE, "the log truncated once both serve it")
    assert [rec.seq for rec in log.read(0, 2)] == [3]
    size_after = log.size()
    probe = {"user_id": USER, "k": 50, "exclude_seen": False}
    want = [i["item_id"] for i in wa.post("/v1/retrieve", json=probe).json()["items"]]
    assert want[0] == "aimed-1" and not set(want) & set(gone)
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    c = serve(path, **env)  # a restart: the compacted bundle, then record 3 from the short log
    with httpx.Client(base_url=c.url, timeout=30, headers=AUTH) as wc:
        got = [i["item_id"] for i in wc.post("/v1/retrieve", json=probe).json()["items"]]
        assert got == want
        assert wc.get("/admin/bundle").json()["item_log"]["applied_seq"] == 3
        r = wc.put("/admin/items", json={"items": [_aimed(path, USER, 2)]})
        assert r.status_code == 200 and r.json()["seq"] == 4, r.text  # the sequence goes on
    assert _top(a.url) == "aimed-2"
    report.add(
        "Item log truncated after compaction (two replicas reloading at different times)",
        {
            "log bytes before / after": f"{size_before} / {size_after}",
            "truncated while a replica served the older bundle": "no",
            "restarted replica serves what the others do": "yes",
        },
    )
