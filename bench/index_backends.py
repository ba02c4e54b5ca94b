"""Index backends side by side: FAISS IVF, FAISS IVF-PQ (with and without the exact
re-rank), FAISS HNSW and Milvus Lite, on the same synthetic catalogue and the same weighted
queries, through the one ``VectorIndex`` interface the service uses.

Per backend: build time, bytes per item, weighted recall@k (min and mean over the weight grid),
single-query latency p50/p99 (one thread, as the service searches), batch throughput, and
filtered search (a numeric attribute, ``bucket`` uniform in [0, 100), filtered at 50/10/1 %):
latency and recall against brute force over the allowed rows. A second table sweeps selectivity
for IVF and HNSW with the exact fallback off and on, which is where ``exact_below`` comes from.

    .venv/bin/python bench/index_backends.py --items 100000
    .venv/bin/python bench/index_backends.py --items 1000000 --skip milvus-ivf,hnsw

Items and users are ``bench/index_build.py``'s topic vectors (ReLU-tower-like: shared offset,
log-normal norms). Each run writes bench/results/index-backends-<N>k-w<share>.{md,json};
bench/results/index-backends.md collects the tables and says what to pick when.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# Same BLAS threading as `csmf serve` (see service/cli.py), before numpy is imported: with two
# BLAS threads on a busy machine the exact filtered search's matmul took 20 ms instead of 2.7.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from index_build import topic_vectors  # noqa: E402  (a sibling: this script's folder)

from csmf.index import IndexSpec, RowSet, VectorIndex, Where, open_index  # noqa: E402
from csmf.index.faiss import FaissIndex, FaissSpec  # noqa: E402
from csmf.index.filters import ItemAttributes, parse_filter  # noqa: E402
from csmf.results import (  # noqa: E402
    finish_run,
    run_info,
    run_line,
    script_command,
    table,
    write_results,
)
from csmf.weights import slice_scale  # noqa: E402
from index_builder.recall import (  # noqa: E402
    exact_topk,
    recall_with_ties,
    tune_search_params,
    weight_grid,
)

BENCH = Path(__file__).resolve().parent
SELECTIVITY = (50, 10, 1)  # % of items a filter allows (main table)
SWEEP = (20, 10, 5, 2, 1, 0.5, 0.2)  # % for the fallback table


def backends(n: int, milvus_dir: Path) -> dict:
    """name → builder of the index from (vectors, attribute table). IVF-PQ at 16 code bytes
    (4 dims per byte). Knobs start at their cap; ``tune`` lowers them (main)."""
    out = {
        "faiss-ivf": lambda x, t: FaissIndex.build(x, FaissSpec("ivf", nprobe=4096), False),
        "faiss-ivfpq-rr8": lambda x, t: FaissIndex.build(
            x, FaissSpec("ivfpq", nprobe=4096, pq_m=16, rerank=8), False
        ),
        "faiss-ivfpq": lambda x, t: FaissIndex.build(x, FaissSpec("ivfpq", pq_m=16), False),
        "faiss-hnsw": lambda x, t: FaissIndex.build(
            x, FaissSpec("hnsw", ef_search=1024, centered=True), False
        ),
    }
    try:
        from csmf.index.milvus import MilvusIndex, MilvusSpec

        for kind in ("flat", "ivf"):
            out[f"milvus-lite-{kind}"] = lambda x, t, kind=kind: MilvusIndex.build(
                x, t, MilvusSpec(str(milvus_dir / f"{kind}.db"), f"bench_{kind}", kind, search_params=(
                    {"nprobe": 4096} if kind == "ivf" else {})), False
            )  # fmt: skip
    except Exception as exc:  # pymilvus missing: FAISS only
        print(f"milvus skipped: {exc}")
    return out


def folder_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def latency(index: VectorIndex, q: np.ndarray, k: int, where=None, n: int = 200) -> tuple:
    index.search(q[:1], k, where)  # warm
    lat = []
    for i in range(min(n, len(q))):
        t0 = time.perf_counter()
        index.search(q[i : i + 1], k, where)
        lat.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(lat)), 1e3 * float(np.percentile(lat, 99))


def filtered_truth(x: np.ndarray, q: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    rows = np.flatnonzero(mask)
    s, _ = exact_topk(x[rows], q, min(k, len(rows)))
    return s


def filtered_recall(x, q, rows, truth_s) -> float:
    kk = truth_s.shape[1]
    return float(recall_with_ties(x, q, rows[:, :kk], truth_s).mean())


def measure(name, build, x, table, attrs, queries, exact, k, tmp: Path, tune) -> dict:
    t0 = time.perf_counter()
    index = build(x, table)
    build_s = time.perf_counter() - t0
    folder = tmp / name
    folder.mkdir()
    section = IndexSpec.model_validate(index.save(folder))
    if section.backend == "milvus":
        nbytes = folder_bytes(Path(section.uri))  # the whole Lite database (this collection)
        index.close()
    else:
        nbytes = section.bytes
    index = open_index(section, folder)  # as the service opens it
    t0 = time.perf_counter()
    tuned = tune(name, index)
    tune_s = time.perf_counter() - t0
    rec = []
    for q, ex in zip(queries, exact, strict=True):
        _, rows = index.search(q, k)
        rec.append(float(recall_with_ties(x, q, rows, ex).mean()))
    q0 = queries[0]
    p50, p99 = latency(index, q0, k)
    t0 = time.perf_counter()
    for s in range(0, len(q0), 100):
        index.search(q0[s : s + 100], k)
    batch_qps = len(q0) / (time.perf_counter() - t0)
    row = {
        "backend": name,
        "build_s": round(build_s, 1),
        "search_params": tuned,
        "tune_s": round(tune_s, 1),
        "bytes_per_item": round(nbytes / len(x), 1),
        "disk_extra_bytes_per_item": round((section.exact_vectors_bytes or 0) / len(x), 1),
        "recall_min": round(min(rec), 4),
        "recall_mean": round(float(np.mean(rec)), 4),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "batch_qps": round(batch_qps, 1),
    }
    for pct in SELECTIVITY:
        f = parse_filter({"field": "bucket", "lt": pct}, attrs.schema)
        allowed = RowSet(attrs.mask(f))
        where = Where(filter=f, allowed=allowed)
        qf = q0[:100]
        truth = filtered_truth(x, qf, allowed.mask, k)
        _, rows = index.search(qf, k, where)
        row[f"f{pct}_recall"] = round(filtered_recall(x, qf, rows, truth), 4)
        row[f"f{pct}_p50_ms"] = round(latency(index, qf, k, where, 100)[0], 3)
    index.close()
    print(json.dumps(row), flush=True)
    return row


def fallback_sweep(x, attrs, q, k) -> list[dict]:
    """IVF / HNSW filtered search per selectivity, three ways: the ANN with the configured knob
    (widening off), the ANN with nprobe / efSearch widened by 1/share (the default), and the
    exact search over the allowed rows: recall vs brute force over the allowed rows, p50."""
    out = []
    for kind, spec in (
        ("ivf", FaissSpec("ivf", nprobe=32, exact_below=0.0)),
        ("hnsw", FaissSpec("hnsw", ef_search=128, centered=True, exact_below=0.0)),
    ):
        index = FaissIndex.build(x, spec, False)
        for pct in SWEEP:
            f = parse_filter({"field": "bucket", "lt": pct}, attrs.schema)
            allowed = RowSet(attrs.mask(f))
            where = Where(filter=f, allowed=allowed)
            truth = filtered_truth(x, q, allowed.mask, k)
            r = {"index": kind, "allowed_pct": pct}
            for mode, below, widen in (("fixed", 0.0, False), ("widened", 0.0, True),
                                       ("exact", 1.0, True)):  # fmt: skip
                index.exact_below, index.widen_filtered = below, widen
                _, rows = index.search(q, k, where)
                r[f"{mode}_recall"] = round(filtered_recall(x, q, rows, truth), 4)
                r[f"{mode}_p50_ms"] = round(latency(index, q, k, where, 100)[0], 3)
            print(json.dumps(r), flush=True)
            out.append(r)
    return out


def markdown(meta: dict, rows: list[dict], sweep: list[dict]) -> list[str]:
    k = meta["k"]
    lines = [
        f"{run_line(meta['run'])} faiss {meta['faiss']}, cores shared with other jobs (±30 % run "
        "to run). One search thread. Recall@"
        f"{k} against brute force on weighted queries ({meta['queries']} users × "
        f"{len(meta['grid'])} weightings {meta['grid']}); filtered recall against brute force "
        "over the allowed rows (100 queries, weights ⟨1, 1.8, 1.2⟩). Each approximate index's "
        "knob is tuned as `csmf build-index --tune` does, to min weighted recall "
        f"≥ {meta['target']} on {meta['queries']} other users (IVF-PQ without re-rank keeps the "
        "re-ranked variant's nprobe).",
        "",
    ]
    head = ["backend", "search params", "build s", "bytes/item (memory)", "+ on disk",
            "recall min / mean", "p50 / p99 ms", "batch q/s", "filter 50 %: recall, p50 ms",
            "10 %", "1 %"]  # fmt: skip
    lines += table(
        head,
        (
            [r["backend"], r["search_params"] or "–", r["build_s"], r["bytes_per_item"],
             r["disk_extra_bytes_per_item"] or "–",
             f"{r['recall_min']:.3f} / {r['recall_mean']:.3f}",
             f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}", f"{r['batch_qps']:,.0f}",
             *(f"{r[f'f{p}_recall']:.3f}, {r[f'f{p}_p50_ms']:.2f}" for p in SELECTIVITY)]
            for r in rows
        ),
    )  # fmt: skip
    lines += [
        "",
        "Milvus Lite bytes/item is the size of its database folder (vectors, attributes, index "
        "and log); it is an engine for development (one process, data on local disk). Milvus "
        "Standalone/Distributed is the production engine behind the same interface; it is not "
        "measured here (no container runtime on this machine).",
        "",
        "## The selective-filter fallback (`exact_below`)",
        "",
        "Filtered search per share of the catalogue a filter allows: the ANN with an ID-selector "
        "bitmap and the configured knob (nprobe 32 / efSearch 128), the same with the knob "
        "widened by 1/share (what the service does), and the exact search over the allowed rows "
        "(what it does below `exact_below`). Recall@50 against brute force over the allowed "
        "rows, p50 latency in ms.",
        "",
    ]
    modes = ("fixed", "widened", "exact")
    lines += table(
        ["index", "allowed", "fixed knob: recall, p50", "widened: recall, p50", "exact: recall, p50"],
        (
            [r["index"], f"{r['allowed_pct']} %",
             *(f"{r[f'{m}_recall']:.3f}, {r[f'{m}_p50_ms']:.2f}" for m in modes)]
            for r in sweep
        ),
    )  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--topic-share", type=float, default=0.7, help="see bench/index_build.py")
    ap.add_argument("--target", type=float, default=0.95, help="recall the knobs are tuned to")
    ap.add_argument("--skip", default="", help="comma-separated backends to leave out")
    ap.add_argument("--no-sweep", action="store_true", help="skip the fallback sweep")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    info = run_info()
    third = args.dim // 3
    sizes = (args.dim - 2 * third, third, third)
    x, users = topic_vectors(args.items, 2 * args.queries, sizes, args.topic_share)
    tune_users = users[args.queries :]  # disjoint from the measured ones
    users = users[: args.queries]
    rng = np.random.default_rng(1)
    table = pa.table({"bucket": pa.array(rng.random(args.items) * 100.0)})
    attrs = ItemAttributes.from_table(table, {"bucket": "number"})
    grid = weight_grid(3)
    queries = [np.ascontiguousarray(users * slice_scale(w, sizes), np.float32) for w in grid]
    faiss.omp_set_num_threads(2)  # brute-force truth only
    exact = [exact_topk(x, q, args.k)[0] for q in queries]
    faiss.omp_set_num_threads(1)
    chosen: dict[str, dict] = {}

    def tune(name: str, index: VectorIndex) -> dict:
        """As `csmf build-index --tune`: the smallest nprobe / efSearch (from the configured cap)
        whose min weighted recall on other users reaches the target. IVF-PQ without re-rank
        keeps the re-ranked variant's nprobe, to show what the codes alone give."""
        if name == "faiss-ivfpq" and "faiss-ivfpq-rr8" in chosen:
            index.set_search_params({**chosen["faiss-ivfpq-rr8"], "rerank": 0})
        elif index.knob() is not None:
            tune_search_params(index, x, tune_users, sizes, args.k, args.target, grid)
        chosen[name] = index.search_params
        return chosen[name]

    skip = {s for s in args.skip.split(",") if s}
    rows = []
    with tempfile.TemporaryDirectory(dir=BENCH.parent) as tmp:
        tmp = Path(tmp)
        for name, build in backends(args.items, tmp).items():
            if name in skip:
                continue
            rows.append(measure(name, build, x, table, attrs, queries, exact, args.k, tmp, tune))
            shutil.rmtree(tmp / name, ignore_errors=True)
    sweep = [] if args.no_sweep else fallback_sweep(x, attrs, queries[0][:100], args.k)
    meta = {
        "items": args.items,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "target": args.target,
        "topic_share": args.topic_share,
        "grid": [list(w) for w in grid],
        "command": script_command(__file__),
        "faiss": faiss.__version__,
        "run": finish_run(info),
    }
    suffix = f"-{args.items // 1000}k-w{args.topic_share}"  # index-backends.md sums them up
    title = (
        f"Index backends: {args.items:,} items ({args.dim} dims), topic share {args.topic_share}"
    )
    doc = {"meta": meta, "backends": rows, "fallback": sweep}
    md, _ = write_results(
        Path(args.out) / f"index-backends{suffix}",
        title,
        meta["command"],
        markdown(meta, rows, sweep),
        doc,
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
