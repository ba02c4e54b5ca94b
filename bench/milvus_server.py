"""The service on FAISS IVF against the service on a real Milvus server, and Milvus's own client
search, side by side on one catalogue; then item writes into Milvus while the service reads.

    nice .venv/bin/python bench/milvus_server.py --items 1000000

One synthetic catalogue and random-weight model (bench/serve_data.py, cached under
``--cache``), two bundles of the same run: FAISS IVF (nlist automatic, nprobe 32) and Milvus
IVF_FLAT with the same nlist and nprobe in a Milvus 2.3.5 Standalone started here
(csmf/index/milvus_server.py, no Docker). Reads, per path, for the same queries (known users,
random objective weights, k=50):

* weighted recall@50 against brute force over the item vectors (with ties);
* µs per query: in-process FAISS and Milvus's client alone (one query at a time: wall time, and
  the Milvus server's CPU per query); the services: server CPU per request, the Milvus process
  included for the service on Milvus;
* requests/s and latency at ``--connections`` (wrk, varied bodies as bench/serve.py), the two
  services loaded one after the other within each of ``--rounds`` rounds (medians kept).

Writes, two ways. Through the index seam: items are upserted
(``MilvusIndex.upsert``, the call the service makes) in batches of ``--write-batch`` from this
process while wrk reads through the service on Milvus: items/s, read p99 with and without the
writes in the same round, and the time until a write is visible to the service (a different
client: no read-your-writes there). The written rows are existing rows with their own vectors,
so recall and truth stay valid and reruns start from the same collection.

Results: bench/results/milvus-server.{md,json}, with the commit, the load average before and
after, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from serve_bodies import make_bodies, write_lua  # noqa: E402  (siblings: this script's folder)
from serve_data import bench_bundle  # noqa: E402
from serve_load import wrk  # noqa: E402
from serve_servers import free_port, start_service, stop, tree_cpu, wait_ready  # noqa: E402
from service_writes import (  # noqa: E402
    TOKEN,
    ApiWriter,
    drop_logs,
    drop_redis,
    redis_settings,
    section,
    summarise,
)
from service_writes import visibility as api_visibility  # noqa: E402

from csmf.results import (  # noqa: E402
    finish_run,
    run_info,
    run_line,
    script_command,
    table,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
K = 50


def _cpu(pid: int) -> float:
    return sum(tree_cpu(pid).values())


# -- data -----------------------------------------------------------------------------------------


def milvus_bundle(faiss_bundle: Path, uri: str, nprobe: int) -> Path:
    """The same run as ``faiss_bundle``, indexed as IVF_FLAT in the Milvus server (built once
    per server data folder: the bundle pins its collection)."""
    from csmf.bundle import read_manifest
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    out = faiss_bundle.parent / f"bundle-milvus-ivf-{nprobe}"
    if (out / "manifest.json").exists():
        return out
    nlist = read_manifest(faiss_bundle / "manifest.json").index.build_params["nlist"]
    cfg = BuildConfig(
        backend="milvus", uri=uri, index="ivf", nlist=nlist, nprobe=nprobe, collection="bench",
        recall_floor=0.0,  # measured below, against the same truth as FAISS
    )  # fmt: skip
    t0 = time.perf_counter()
    build_bundle(faiss_bundle.parent / "run", out, cfg, progress=True)
    print(f"milvus bundle built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def queries(bundle, n: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """n request bodies (known user, random weights, k=50, nothing excluded) and their scaled
    query vectors, as the service computes them."""
    rng = np.random.default_rng(seed)
    ids = bundle.users.ids
    bodies, qs = [], []
    for _ in range(n):
        uid = str(ids[rng.integers(len(ids))])
        w = {o: round(float(rng.uniform(0.1, 2)), 2) for o in bundle.objectives}
        row, hist = bundle.users.get(uid)
        bodies.append({"user_id": uid, "weights": w, "k": K, "exclude_seen": False})
        qs.append(bundle.encoder.encode([row], [hist])[0] * bundle.scale(w))
    return bodies, np.asarray(qs, np.float32)


def truth(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    from index_builder.recall import exact_topk

    return exact_topk(x, q, K)[0]


def recall(x, q, rows, want) -> float:
    from index_builder.recall import recall_with_ties

    return float(recall_with_ties(x, q, rows, want).mean())


# -- reads ----------------------------------------------------------------------------------------


def faiss_alone(bundle, q: np.ndarray) -> tuple[np.ndarray, float]:
    import faiss

    faiss.omp_set_num_threads(1)
    bundle.index.search(q[:1], K)
    rows = []
    t = time.process_time()
    for x in q:
        rows.append(bundle.index.search(x[None], K)[1][0])
    return np.asarray(rows), (time.process_time() - t) / len(q) * 1e6


def milvus_alone(uri: str, collection: str, nprobe: int, q: np.ndarray, server_pid: int) -> dict:
    """Milvus's own client, one query at a time, default (Bounded) consistency."""
    from pymilvus import MilvusClient

    c = MilvusClient(uri=uri)
    params = {"metric_type": "IP", "params": {"nprobe": nprobe}}
    c.search(collection, data=[q[0]], limit=K, search_params=params)
    rows = []
    cpu0, t0 = _cpu(server_pid), time.perf_counter()
    for x in q:
        hits = c.search(collection, data=[x], limit=K, search_params=params)[0]
        rows.append([h["id"] for h in hits] + [-1] * (K - len(hits)))
    wall = (time.perf_counter() - t0) / len(q) * 1e6
    server = (_cpu(server_pid) - cpu0) / len(q) * 1e6
    c.close()
    return {"rows": np.asarray(rows), "wall_us": wall, "server_cpu_us": server}


def service_rows(port: int, bodies: list[dict], item_rows: dict[str, int]) -> np.ndarray:
    import httpx

    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        for b in bodies:
            r = c.post("/v1/retrieve", json=b)
            r.raise_for_status()
            got = [item_rows[it["item_id"]] for it in r.json()["items"]]
            out.append(got + [-1] * (K - len(got)))
    return np.asarray(out)


def loaded(port: int, lua: Path, seconds: int, conns: int, pid: int, extra_pid: int | None):
    """wrk on one service; server CPU per request includes ``extra_pid`` (the Milvus server)."""
    extra0 = _cpu(extra_pid) if extra_pid else 0.0
    r = wrk(port, lua, seconds, conns, pid)
    if extra_pid:
        extra = _cpu(extra_pid) - extra0
        r["milvus_cpu_us_per_req"] = extra / r["requests"] * 1e6
        r["cpu_us_per_req"] += r["milvus_cpu_us_per_req"]
    return r


# -- writes ---------------------------------------------------------------------------------------


class Writer:
    """Upserts batches of existing rows (their own vectors and item-table attributes) through
    the index seam, in a thread, until stopped; counts items written."""

    def __init__(self, bundle_path: Path, batch: int, x: np.ndarray) -> None:
        import pyarrow.parquet as pq

        from csmf.bundle import load_bundle

        self.bundle = load_bundle(bundle_path, verify=False)  # its own Milvus client
        self.batch, self.n, self.x = batch, len(x), x
        fields = list(self.bundle.index.fields)  # the item table's stored columns
        table = pq.read_table(bundle_path / "items.parquet", columns=fields)
        self.cols = {f: np.asarray(table.column(f).to_pylist(), object) for f in fields}
        self.items = 0
        self.seconds = 0.0  # wall time of the writer, reads of the rows' values included
        self.upsert_seconds = 0.0  # inside MilvusIndex.upsert only
        self._stop = threading.Event()
        self.error: Exception | None = None

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        index = self.bundle.index
        t0 = time.perf_counter()
        try:
            while not self._stop.is_set():
                rows = np.sort(rng.choice(self.n, self.batch, replace=False))
                cols = {f: c[rows] for f, c in self.cols.items()}
                v = self.x[rows]
                t = time.perf_counter()
                index.upsert(rows, v, cols)
                self.upsert_seconds += time.perf_counter() - t
                self.items += len(rows)
        except Exception as exc:  # reported, not swallowed
            self.error = exc
        self.seconds = time.perf_counter() - t0

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.error is not None:
            raise self.error


def visibility(bundle_path: Path, port: int, body: dict, q: np.ndarray, tries: int) -> list[float]:
    """Seconds from an acknowledged upsert (this process's client) until the service (another
    client) returns it: row r gets a vector far along q, then the service is polled; the row's
    own vector is written back afterwards."""
    import httpx

    from csmf.bundle import load_bundle

    b = load_bundle(bundle_path, verify=False)
    index = b.index
    out = []
    rng = np.random.default_rng(2)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for _ in range(tries):
            row = int(rng.integers(len(index)))
            item = str(b.item_ids[row])
            rows = np.array([row])
            own = index.vectors(rows)
            attrs = index._stored(rows, list(index.fields))[row]
            cols = {f: np.array([v], object) for f, v in attrs.items()}
            hot = (q / np.linalg.norm(q) * 1e4).astype(np.float32)[None]
            t0 = time.perf_counter()
            index.upsert(rows, hot, cols)
            while True:
                items = c.post("/v1/retrieve", json={**body, "k": 1}).json()["items"]
                if items and items[0]["item_id"] == item:
                    break
                time.sleep(0.005)
            out.append(time.perf_counter() - t0)
            index.upsert(rows, own, cols)
    b.close()
    return out


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--queries", type=int, default=300, help="recall / µs-per-query sample")
    ap.add_argument("--duration", type=int, default=8, help="seconds of wrk per measurement")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="service worker processes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write-batch", type=int, default=1000)
    ap.add_argument("--visibility-tries", type=int, default=5)
    ap.add_argument("--redis", help="Redis URL carrying the item-log position between workers")
    ap.add_argument("--port", type=int, default=19530, help="the Milvus server's port")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "milvus-server")
    a = ap.parse_args()

    from csmf.index.milvus_server import MilvusServer, machine_slot

    info = run_info(ROOT)
    t_start = time.time()
    faiss_path = bench_bundle(a.items, a.cache, "ivf", a.nprobe)
    print(f"FAISS bundle: {faiss_path}", flush=True)
    with machine_slot() as had:
        if not had:  # a test session or another bench: wait for it rather than fail
            print("waiting for this machine's Milvus server slot (held by another process)")
    with machine_slot(blocking=True):
        server = MilvusServer(
            a.cache / f"serve-{a.items}" / "milvus-server", a.port, 9091,
            bin_dir=ROOT / ".cache" / "milvus-server" / "bin",
        )  # fmt: skip
        server.prepare()
        server.start()
        try:
            ready = server.wait_ready(600)
            print(f"Milvus ready in {ready:.1f} s", flush=True)
            doc = run(a, faiss_path, server)
            doc["milvus_ready_s"] = round(ready, 1)
        finally:
            server.stop()
    doc["run"] = finish_run(info)
    doc["wall_s"] = round(time.time() - t_start)
    doc["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs"
    command = script_command(__file__)
    write_results(a.out, "Milvus server beside FAISS", command, markdown(doc), doc)
    print(json.dumps(doc, indent=1))


def run(a, faiss_path: Path, server) -> dict:
    from csmf.bundle import load_bundle

    milvus_path = milvus_bundle(faiss_path, server.uri, a.nprobe)
    fb = load_bundle(faiss_path, verify=False)
    mb = load_bundle(milvus_path, verify=False)
    n = len(fb.item_ids)
    assert list(mb.item_ids) == list(fb.item_ids), "the two bundles' item tables differ"
    x = fb.index.vectors(np.arange(n))  # IVF_FLAT keeps exact vectors
    bodies, q = queries(fb, a.queries)
    want = truth(x, q)
    doc: dict = {
        "items": n,
        "dim": int(x.shape[1]),
        "nlist": fb.manifest.index.build_params["nlist"],
        "nprobe": a.nprobe,
        "k": K,
        "queries": a.queries,
        "connections": a.connections,
        "workers": a.workers,
        "rounds": a.rounds,
    }
    rows, us = faiss_alone(fb, q)
    doc["faiss_alone"] = {"recall": recall(x, q, rows, want), "cpu_us": us}
    alone = milvus_alone(
        server.uri, mb.manifest.index.collection_version, a.nprobe, q, server.proc.pid
    )
    doc["milvus_alone"] = {
        "recall": recall(x, q, alone["rows"], want),
        "wall_us": alone["wall_us"],
        "server_cpu_us": alone["server_cpu_us"],
    }
    print(json.dumps({k: doc[k] for k in ("faiss_alone", "milvus_alone")}), flush=True)
    fb.close()

    tmp = Path(tempfile.mkdtemp(prefix="milvus-bench-"))
    lua = write_lua(make_bodies(faiss_path, n, count=5000, k=K), tmp / "bodies.lua")
    ports = {"faiss": free_port(), "milvus": free_port()}
    drop_logs(faiss_path, milvus_path)  # an earlier run's writes are not replayed
    paths = {"faiss": faiss_path, "milvus": milvus_path}
    redis = redis_settings(a.redis)
    doc["redis"] = bool(redis)
    procs = {
        name: start_service(paths[name], ports[name], a.workers, tmp, admin_token=TOKEN, **redis)
        for name in ports
    }
    item_rows = mb.item_rows
    try:
        for name, port in ports.items():
            wait_ready(port, procs[name])
        api = {name: ApiWriter(port, paths[name], a.write_batch, x) for name, port in ports.items()}
        extra = {"faiss": None, "milvus": server.proc.pid}
        for name, port in ports.items():
            got = service_rows(port, bodies, item_rows)
            doc[f"service_{name}_recall"] = recall(x, q, got, want)
        runs: dict[str, list] = {
            "faiss": [], "milvus": [], "milvus_writes": [], "faiss_api": [], "milvus_api": []
        }  # fmt: skip
        api_runs: dict[str, list] = {"faiss": [], "milvus": []}
        writes, writer_share = [], []
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", flush=True)
            runs["faiss"].append(
                loaded(ports["faiss"], lua, a.duration, a.connections, procs["faiss"].pid, None)
            )
            runs["milvus"].append(
                loaded(ports["milvus"], lua, a.duration, a.connections, procs["milvus"].pid,
                       server.proc.pid)
            )  # fmt: skip
            w = Writer(milvus_path, a.write_batch, x).start()
            try:
                runs["milvus_writes"].append(
                    loaded(ports["milvus"], lua, a.duration, a.connections, procs["milvus"].pid,
                           server.proc.pid)
                )  # fmt: skip
            finally:
                w.stop()
            writes.append(w.items / max(w.upsert_seconds, 1e-9))
            writer_share.append(w.upsert_seconds / max(w.seconds, 1e-9))
            w.bundle.close()
            for name, port in ports.items():  # PUT /admin/items while wrk reads
                api[name].start()
                try:
                    runs[f"{name}_api"].append(
                        loaded(port, lua, a.duration, a.connections, procs[name].pid, extra[name])
                    )
                finally:
                    api_runs[name].append(api[name].stop())
        for key, rs in runs.items():
            doc[f"service_{key}"] = {
                m: statistics.median(r[m] for r in rs)
                for m in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "non_2xx")
            }
            if key.startswith("milvus"):
                doc[f"service_{key}"]["milvus_cpu_us_per_req"] = statistics.median(
                    r["milvus_cpu_us_per_req"] for r in rs
                )
        doc["writes_items_per_s"] = statistics.median(writes)
        doc["writer_upsert_share"] = statistics.median(writer_share)
        doc["write_batch"] = a.write_batch
        vis = visibility(milvus_path, ports["milvus"], bodies[0], q[0], a.visibility_tries)
        doc["visible_s"] = {"median": statistics.median(vis), "max": max(vis), "tries": len(vis)}
        doc["api_writes"] = {name: summarise(rs) for name, rs in api_runs.items()}
        doc["api_visible"] = {
            name: api_visibility(port, paths[name], bodies[0], q[0], x, a.visibility_tries)
            for name, port in ports.items()
        }
    finally:
        for p in procs.values():
            stop(p)
        mb.close()
        drop_logs(faiss_path, milvus_path)
        drop_redis(redis)
    return doc


def markdown(d: dict) -> list[str]:
    sf, sm, sw = d["service_faiss"], d["service_milvus"], d["service_milvus_writes"]
    reads = table(
        ["path", "weighted recall@50", "µs / query", "req/s", "p50 ms", "p99 ms"],
        [
            ["FAISS IVF in-process (one query at a time)", f"{d['faiss_alone']['recall']:.3f}",
             f"{d['faiss_alone']['cpu_us']:.0f} CPU", "", "", ""],
            ["Milvus client alone (one query at a time)", f"{d['milvus_alone']['recall']:.3f}",
             f"{d['milvus_alone']['wall_us']:.0f} wall, {d['milvus_alone']['server_cpu_us']:.0f} "
             "server CPU", "", "", ""],
            [f"service on FAISS IVF ({d['workers']} workers)", f"{d['service_faiss_recall']:.3f}",
             f"{sf['cpu_us_per_req']:.0f} CPU", f"{sf['rps']:.0f}", f"{sf['p50_ms']:.1f}",
             f"{sf['p99_ms']:.1f}"],
            [f"service on Milvus ({d['workers']} workers)", f"{d['service_milvus_recall']:.3f}",
             f"{sm['cpu_us_per_req']:.0f} CPU (service + Milvus; Milvus "
             f"{sm['milvus_cpu_us_per_req']:.0f})", f"{sm['rps']:.0f}",
             f"{sm['p50_ms']:.1f}", f"{sm['p99_ms']:.1f}"],
        ],
        "lllrrr",
    )  # fmt: skip
    writes = table(
        ["figure", "value"],
        [
            ["items upserted / s (batches of "
             f"{d['write_batch']}, time inside MilvusIndex.upsert: "
             f"{100 * d['writer_upsert_share']:.0f} % of the writer thread's wall time)",
             f"{d['writes_items_per_s']:.0f}"],
            ["service on Milvus, reads without writes: req/s, p99 ms",
             f"{sm['rps']:.0f}, {sm['p99_ms']:.1f}"],
            ["service on Milvus, reads during writes: req/s, p99 ms",
             f"{sw['rps']:.0f}, {sw['p99_ms']:.1f}"],
            ["write visible to the service (another client), median / max s",
             f"{d['visible_s']['median']:.2f} / {d['visible_s']['max']:.2f}"],
        ],
        "lr",
    )  # fmt: skip
    ratio = sf["rps"] / sm["rps"] if sm["rps"] else float("nan")
    return [
        f"{d['items']:,} items, {d['dim']} dims, IVF nlist {d['nlist']} / nprobe {d['nprobe']} "
        f"on both engines (Milvus IVF_FLAT), k={d['k']}; {d['queries']} queries (known users, "
        f"random objective weights); wrk at {d['connections']} connections, medians of "
        f"{d['rounds']} interleaved rounds. Milvus 2.3.5 Standalone (embedded etcd, no Docker; "
        f"ready {d['milvus_ready_s']} s after start) on the same machine: {d['machine']}. "
        f"{run_line(d['run'])} Run under `nice`, wall {d['wall_s']} s.",
        "",
        "## Reads",
        "",
        *reads,
        "",
        f"The service on FAISS answered {ratio:.1f}x the requests/s of the service on Milvus in "
        "the same rounds. Milvus is a separate process reached over gRPC: each request pays a "
        "round trip, protobuf encoding of the query and the 50 hits, and Milvus's own "
        "scheduling (its search is the same IVF scan), and its CPU is on the same 2 cores.",
        "",
        "## Writes",
        "",
        *writes,
        "",
        "Writes are upserts of existing rows (their own vectors and attributes) through the "
        "index seam from the bench process, while wrk reads through the service on Milvus; the "
        "admin item API's figures are in the next section. Visibility is measured from the "
        "acknowledged upsert to the first service answer containing the item: the service is "
        "another Milvus client, so it sees a write once Milvus has applied it (no read-your-"
        "writes across clients).",
        "",
        *section(d),
    ]


if __name__ == "__main__":
    sys.exit(main())
