"""Item writes through a running service's admin API under read load: called by
bench/milvus_server.py for the service on FAISS IVF and on Milvus, in the same rounds.

* :class:`ApiWriter` sends ``PUT /admin/items`` batches (existing items, their own vectors and
  attributes: the catalogue's content does not change, so recall and truth stay valid) back to
  back on one connection while wrk reads; items/s counts acknowledged items (a 200 comes once the
  record is fsynced, applied, and applied by every worker of the server) over the writer's wall
  time. Bodies are serialised before the clock starts: the figure is the service's, not the
  client's JSON encoding.
* :func:`visibility` puts one existing item with a vector far along a user's query and polls
  that user's top-1 on fresh connections (any worker): seconds from sending the PUT to its 200,
  and from the 200 to the first read that returns the item; then puts the item's own vector back.

Writes land in the item log beside the bundle; :func:`drop_logs` removes it before and after a run
so a cached bench bundle never replays an earlier run's writes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def redis_settings(url: str | None) -> dict[str, str]:
    """Service settings for Redis to carry the log position (pub/sub wakes the other workers at
    once; without it they find a record at their next poll of the log, ``sync_interval_s``)."""
    return {"redis_url": url, "redis_prefix": f"bench-writes-{os.getpid()}:"} if url else {}


def drop_redis(settings: dict[str, str]) -> None:
    if settings:
        import redis

        c = redis.Redis.from_url(settings["redis_url"])
        for key in c.scan_iter(f"{settings['redis_prefix']}*"):
            c.delete(key)


def drop_logs(*bundles: Path) -> None:
    for b in bundles:
        Path(b).parent.joinpath(f"{Path(b).name}.items.log").unlink(missing_ok=True)


def _attributes(bundle_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Item ids and the filterable attribute columns of the bundle's item table."""
    import pyarrow.parquet as pq

    from csmf.bundle import ITEM_ID_COLUMN, read_manifest

    names = [a.name for a in read_manifest(bundle_path / "manifest.json").attributes]
    table = pq.read_table(bundle_path / "items.parquet", columns=[ITEM_ID_COLUMN, *names])
    ids = np.asarray(table.column(ITEM_ID_COLUMN).to_pylist(), object)
    return ids, {n: np.asarray(table.column(n).to_pylist(), object) for n in names}


def _item(iid, attrs: dict[str, np.ndarray], row: int, vector: np.ndarray) -> dict:
    return {"item_id": str(iid), **{n: c[row] for n, c in attrs.items()}, "vector": vector.tolist()}


class ApiWriter:
    """``PUT /admin/items`` batches in a thread until stopped."""

    def __init__(self, port: int, bundle_path: Path, batch: int, x: np.ndarray, bodies: int = 8):
        ids, attrs = _attributes(bundle_path)
        rng = np.random.default_rng(1)
        self.bodies = []
        for _ in range(bodies):
            rows = np.sort(rng.choice(len(ids), batch, replace=False))
            items = [_item(ids[r], attrs, int(r), x[r]) for r in rows.tolist()]
            self.bodies.append(json.dumps({"items": items}).encode())
        self.url, self.batch = f"http://127.0.0.1:{port}", batch
        self.items, self.seconds, self.acks = 0, 0.0, []
        self.error: Exception | None = None
        self._stop = threading.Event()

    def _run(self) -> None:
        import httpx

        t0 = time.perf_counter()
        try:
            with httpx.Client(base_url=self.url, timeout=120, headers=AUTH) as c:
                k = 0
                while not self._stop.is_set():
                    t = time.perf_counter()
                    r = c.put("/admin/items", content=self.bodies[k % len(self.bodies)])
                    k += 1
                    if r.status_code == 503:  # durable, not confirmed on every worker in time
                        self.unconfirmed += self.batch
                        self.detail = r.json().get("detail", r.text)
                        continue
                    r.raise_for_status()
                    self.acks.append(time.perf_counter() - t)
                    self.items += len(r.json()["written"])
        except Exception as exc:  # reported by stop(), not swallowed
            self.error = exc
        self.seconds = time.perf_counter() - t0

    def start(self) -> ApiWriter:
        """Start (again: one writer serves every round, its bodies built once)."""
        self.items, self.seconds, self.acks, self.error = 0, 0.0, [], None
        self.unconfirmed, self.detail = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(300)
        if self.error is not None:
            raise self.error
        acks = np.asarray(self.acks) * 1000
        return {
            "items_per_s": self.items / max(self.seconds, 1e-9),
            "batches": len(acks),
            "unconfirmed_items": self.unconfirmed,  # 503: durable, not confirmed everywhere in time
            "unconfirmed_detail": self.detail,
            "ack_p50_ms": float(np.percentile(acks, 50)) if len(acks) else float("nan"),
            "ack_p99_ms": float(np.percentile(acks, 99)) if len(acks) else float("nan"),
        }


def summarise(rounds: list[dict]) -> dict:
    """Medians over rounds; unconfirmed items summed, with one 503's detail."""
    out = {m: float(np.median([r[m] for r in rounds])) for m in ("items_per_s", "batches",
           "ack_p50_ms", "ack_p99_ms")}  # fmt: skip
    out["unconfirmed_items"] = sum(r["unconfirmed_items"] for r in rounds)
    out["unconfirmed_detail"] = next(
        (r["unconfirmed_detail"] for r in rounds if r["unconfirmed_detail"]), None
    )
    return out


def visibility(
    port: int, bundle_path: Path, body: dict, q: np.ndarray, x: np.ndarray, tries: int
) -> dict:
    """Seconds from PUT sent to its 200, and from the 200 to the first read (fresh connection)
    that returns the item, over ``tries`` existing items; each gets its own vector back after."""
    import httpx

    ids, attrs = _attributes(bundle_path)
    rng = np.random.default_rng(2)
    hot = (q / np.linalg.norm(q) * 1e4).astype(np.float32)
    ack, after, reads = [], [], []
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as admin:
        for _ in range(tries):
            row = int(rng.integers(len(ids)))
            t0 = time.perf_counter()
            r = admin.put("/admin/items", json={"items": [_item(ids[row], attrs, row, hot)]})
            if r.status_code != 503:  # a 503 is durable too: the clock runs until it is served
                r.raise_for_status()
            t1 = time.perf_counter()
            reads.append(0)
            while True:
                reads[-1] += 1
                if time.perf_counter() - t1 > 60:
                    raise RuntimeError(f"item {ids[row]} not served 60 s after its 200")
                with httpx.Client(base_url=url, timeout=60) as reader:  # any worker
                    items = reader.post("/v1/retrieve", json={**body, "k": 1}).json()["items"]
                if items and items[0]["item_id"] == str(ids[row]):
                    break
            ack.append(t1 - t0)
            after.append(time.perf_counter() - t1)
            r = admin.put("/admin/items", json={"items": [_item(ids[row], attrs, row, x[row])]})
            if r.status_code != 503:
                r.raise_for_status()
    return {
        "ack_s": {"median": float(np.median(ack)), "max": float(max(ack))},
        "after_ack_s": {"median": float(np.median(after)), "max": float(max(after))},
        "reads_until_served": reads,
        "tries": tries,
    }


def section(d: dict) -> list[str]:
    """The results section: writes through the admin API, both services, same rounds."""
    from csmf.results import table

    rows = []
    for name, label in (("faiss", "FAISS IVF"), ("milvus", "Milvus (server)")):
        w, v = d["api_writes"][name], d["api_visible"][name]
        quiet, busy = d[f"service_{name}"], d[f"service_{name}_api"]
        rows.append([
            f"service on {label}", f"{w['items_per_s']:.0f}",
            f"{w['ack_p50_ms']:.0f} / {w['ack_p99_ms']:.0f}",
            f"{quiet['rps']:.0f} → {busy['rps']:.0f}",
            f"{quiet['p99_ms']:.1f} → {busy['p99_ms']:.1f}",
            f"{v['ack_s']['median']:.3f} / {v['ack_s']['max']:.3f}",
            f"{v['after_ack_s']['median']:.3f} / {v['after_ack_s']['max']:.3f} "
            f"({sum(n == 1 for n in v['reads_until_served'])} of {v['tries']} by the first read)",
        ])  # fmt: skip
    return [
        "## Writes through the service (`PUT /admin/items`)",
        "",
        *table(
            [
                "service",
                "items/s acknowledged",
                "PUT p50 / p99 ms",
                "reads req/s: alone → during writes",
                "read p99 ms: alone → during writes",
                "one-item PUT → 200, median / max s",
                "200 → served, median / max s",
            ],
            rows,
            "lrrrrrr",
        ),  # fmt: skip
        "",
        f"Batches of {d['write_batch']} existing items (their own vectors and attributes) sent "
        f"back to back on one connection while wrk reads at {d['connections']} connections; a "
        "200 means the record is fsynced in the item log, applied by the worker that took it and "
        f"by the server's other worker ({d['workers']} workers); "
        + (
            "Redis carried the log position (pub/sub wakes the other worker at once). "
            if d.get("redis")
            else "no Redis: the other worker finds a record at its next poll "
            "of the log (`sync_interval_s` 0.25 s), which bounds a lone writer's rate. "
        )
        + "On Milvus every worker applies "
        "each record to the one shared collection (the upsert is idempotent), so a write costs "
        "the collection one upsert per worker. Visibility: one item put with a vector far along "
        f"a user's query, then that user's top-1 read on fresh connections ({d['api_visible']['faiss']['tries']} "
        "items per service).",
        *_unconfirmed(d),
    ]


def _unconfirmed(d: dict) -> list[str]:
    lines = []
    for name, w in d["api_writes"].items():
        if w["unconfirmed_items"]:
            lines += [
                "",
                f"Service on {name}: {w['unconfirmed_items']} items over all rounds got "
                "a 503 (the record durable in the log, not confirmed on every worker within "
                f"`items_visible_timeout_s`, 2 s), not counted above: {w['unconfirmed_detail']}",
            ]
    return lines
