"""Is there a cheaper 1M-item search at the recall floor than IVF-Flat at the tuned nprobe?

    .venv/bin/python bench/ivf_variants.py --items 1000000

On the serving benchmark's catalogue (bench/serve_data.py, the ``--tune`` bundle of
bench/serve.py) and real weighted user queries (users of the bundle's snapshot encoded by its
encoder, scaled by each weighting of the builder's recall grid), this measures FAISS variants that
read fewer bytes or compute fewer distances per query, each against the exact top-50 — the
builder's recall with ties, the minimum over the grid — and its CPU µs per single query (k=50)
and per query of a 500-query batch (k=10), one OpenMP thread:

- the bundle's IVF-Flat at nprobe 16 / 20 (the tuned value) / 24;
- the same coarse quantizer with float16, bfloat16 and 8-bit scalar-quantised lists, of the
  items' own vectors and (float16, SQ8) of their residuals from the list's centroid;
- 4-bit PQ fast-scan (32 sub-quantisers, by residual) with an exact re-rank of 4·k candidates;
- an HNSW graph over the same 4,000 centroids as the coarse quantizer (efSearch 128).

Writes bench/results/ivf-variants.{md,json}. Not run by the tests (minutes at 1M items).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from csmf.bundle import load_bundle  # noqa: E402
from csmf.results import (  # noqa: E402
    finish_run,
    run_info,
    run_line,
    script_command,
    table,
    write_results,
)
from csmf.weights import slice_scale  # noqa: E402
from index_builder.recall import exact_topk, recall_with_ties, weight_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 50

Search = Callable[[np.ndarray], np.ndarray]  # (1, D) query -> (1, K) rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=300, help="query users (x 5 weightings)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ivf-variants")
    args = ap.parse_args()
    from serve_data import bench_bundle  # bench/, the script's folder, is importable

    faiss.omp_set_num_threads(1)
    info = run_info()
    path = bench_bundle(args.items, args.cache, tune=True)
    b = load_bundle(path, verify=False)
    base = b.index.index
    ivf = faiss.extract_index_ivf(base)
    x = base.reconstruct_n(0, base.ntotal)  # (N, D) the items' vectors
    rng = np.random.default_rng(1)
    ids = [b.users.ids[i] for i in rng.choice(len(b.users), args.users, replace=False)]
    got = [b.users.get(u) for u in ids]
    users = b.encoder.encode([g[0] for g in got], [g[1] for g in got])
    grid = weight_grid(len(b.objectives))
    queries = {
        w: np.ascontiguousarray(users * slice_scale(w, b.slice_sizes), np.float32) for w in grid
    }
    exact = {w: exact_topk(x, q, K)[0] for w, q in queries.items()}
    every = np.concatenate(list(queries.values()))
    # How close the scores around the k-th are: quantising a vector moves its score by about the
    # format's relative precision (float16: 2^-11 = 4.9e-4), enough to swap items this close.
    top = exact_topk(x, queries[grid[0]], 2 * K)[0]  # (users, 2K) under the default weights
    gap = float(np.median((top[:, K - 1] - top[:, K + 9]) / np.abs(top[:, K - 1])))
    spread = float(np.median((top[:, 0] - top[:, K - 1]) / np.abs(top[:, K - 1])))

    def measure(name: str, index: faiss.Index, search: Search, build_s: float = 0.0) -> dict:
        recalls = []
        for w, q in queries.items():
            rows = np.concatenate([search(q[i : i + 1]) for i in range(len(q))])
            recalls.append(float(recall_with_ties(x, q, rows, exact[w]).mean()))
        search(every[:1])
        t = time.process_time()
        for i in range(len(every)):
            search(every[i : i + 1])
        single = (time.process_time() - t) / len(every) * 1e6
        t = time.process_time()
        index.search(every[:500], 10)
        batch = (time.process_time() - t) / min(500, len(every)) * 1e6
        r = {"variant": name, "min_recall": min(recalls), "single_us": single, "batch_us": batch}
        r["build_s"] = round(build_s, 1)
        print(r, flush=True)
        return r

    def plain(index: faiss.Index) -> Search:
        return lambda q: index.search(q, K)[1]

    def reranked(index: faiss.Index, factor: int) -> Search:
        def search(q: np.ndarray) -> np.ndarray:
            cand = index.search(q, K * factor)[1][0]
            cand = cand[cand >= 0]
            s = x[cand] @ q[0]
            top = np.argsort(-s, kind="stable")[:K]
            return cand[top][None]

        return search

    results = []
    nprobe = int(ivf.nprobe)
    for p in (16, nprobe, 24):
        ivf.nprobe = p
        results.append(measure(f"IVF{ivf.nlist},Flat nprobe {p}", base, plain(base)))
    ivf.nprobe = nprobe
    sample = x[:: max(1, len(x) // 200_000)]
    for qt, label, residual in (
        (faiss.ScalarQuantizer.QT_fp16, "float16", False),
        (faiss.ScalarQuantizer.QT_fp16, "float16 by residual", True),
        (faiss.ScalarQuantizer.QT_bf16, "bfloat16", False),
        (faiss.ScalarQuantizer.QT_8bit, "SQ8", False),
        (faiss.ScalarQuantizer.QT_8bit, "SQ8 by residual", True),
    ):
        t = time.perf_counter()
        sq = faiss.IndexIVFScalarQuantizer(
            ivf.quantizer, ivf.d, ivf.nlist, qt, faiss.METRIC_INNER_PRODUCT, residual
        )
        sq.train(sample)
        sq.add(x)
        build = time.perf_counter() - t
        for p in (nprobe, 32):
            sq.nprobe = p
            results.append(measure(f"IVF{ivf.nlist},{label} nprobe {p}", sq, plain(sq), build))
        del sq
    t = time.perf_counter()
    pq = faiss.index_factory(ivf.d, f"IVF{ivf.nlist},PQ32x4fs", faiss.METRIC_INNER_PRODUCT)
    pq.train(x[:: max(1, len(x) // 256_000)])
    pq.add(x)
    build = time.perf_counter() - t
    for p in (nprobe, 48):
        faiss.extract_index_ivf(pq).nprobe = p
        name = f"IVF{ivf.nlist},PQ32x4fs nprobe {p} + exact re-rank of 4k"
        results.append(measure(name, pq, reranked(pq, 4), build))
    del pq
    t = time.perf_counter()
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    hq = faiss.IndexHNSWFlat(ivf.d, 32, faiss.METRIC_INNER_PRODUCT)
    hq.hnsw.efConstruction = 200
    hq.add(centroids)
    hq.hnsw.efSearch = 128
    hnsw_ivf = faiss.IndexIVFFlat(hq, ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    hnsw_ivf.replace_invlists(ivf.invlists, False)
    hnsw_ivf.ntotal = ivf.ntotal
    hnsw_ivf.is_trained = True
    hnsw_ivf.nprobe = nprobe
    name = f"IVF{ivf.nlist}_HNSW32 (efSearch 128),Flat nprobe {nprobe}"
    results.append(measure(name, hnsw_ivf, plain(hnsw_ivf), time.perf_counter() - t))

    info = finish_run(info)
    rows = [
        [r["variant"], f"{r['min_recall']:.3f}", f"{r['single_us']:.0f}", f"{r['batch_us']:.0f}"]
        for r in results
    ]
    body = [
        f"{args.items:,} items (bundle `{path.name}`: IVF-Flat, {ivf.nlist} lists, tuned nprobe "
        f"{nprobe}), {args.users} users × {len(grid)} weightings. {run_line(info)} Shared cores: "
        f"compare rows, not runs. Recall@{K} is the builder's (ties allowed), the minimum over "
        "the weightings; the floor is 0.97.",
        "",
        f"This catalogue's scores are dense at the top: under the default weights the 1st item "
        f"scores {spread:.2%} above the {K}th and the {K}th {gap:.3%} above the {K + 10}th "
        "(medians over the users) — about float16's relative precision (0.049 %), so any "
        "quantisation of the stored vectors swaps items across the k-th place, by residual "
        "or not. A trained catalogue with wider gaps may keep its recall under float16 or SQ8; "
        "this one, on which the serving targets are stated, does not.",
        "",
        *table(
            ["variant", f"min recall@{K}", "µs / query (k=50)", "µs / query, batch of 500 (k=10)"],
            rows,
        ),
    ]
    md, _ = write_results(
        args.out,
        "Cheaper IVF variants on the serving catalogue",
        script_command(__file__),
        body,
        {
            "run": info,
            "items": args.items,
            "users": args.users,
            "nprobe": nprobe,
            "gap_k_to_k10": gap,
            "spread_1_to_k": spread,
            "results": results,
        },
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
