"""Index-build benchmark at catalogue scale: build time, peak memory, bytes per item, and ANN
recall@k on weighted queries, for the index builder's own FAISS code path.

Item and user vectors are synthetic (seeded), shaped like the synthetic generator's ground-truth
factors (topics, per-objective slices) plus a shared offset and varying norms, as a ReLU tower
produces — see ``topic_vectors``. Run one index type per process so peak memory is per build:

    /usr/bin/time -v .venv/bin/python bench/index_build.py --index ivf  --items 1000000
    /usr/bin/time -v .venv/bin/python bench/index_build.py --index hnsw --items 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from csmf.atomic import write_json
from csmf.index.faiss import FaissIndex
from csmf.results import script_command
from csmf.weights import slice_scale
from index_builder.config import BuildConfig
from index_builder.recall import exact_topk, recall_with_ties, weight_grid


def topic_vectors(
    n_items: int, n_users: int, sizes: tuple[int, ...], topic_share: float = 0.7, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Item and user vectors ``[v_d | v_o | v_r]`` shaped like the synthetic cascade generator's
    ground truth (trainer/data/synthetic.py): Zipf-sized topics (256 at 1M items), a latent of
    topic t = sqrt(w)·centre_t + sqrt(1-w)·noise per slice (w = ``topic_share``, 0.7 in the
    generator; within a topic that leaves isotropic ~60-dim noise, the hardest case for IVF), each objective's slice mixed with
    the previous one (conflict 0.5) — plus what a ReLU tower adds: a shared offset and
    log-normal norms (popularity)."""
    rng = np.random.default_rng(seed)
    n_topics = int(np.clip(n_items // 500, 4, 256))
    topic_p = 1.0 / np.arange(1, n_topics + 1) ** 0.8
    topic_p /= topic_p.sum()
    centres = [rng.standard_normal((n_topics, s)) for s in sizes]  # per objective
    offset = rng.standard_normal(sum(sizes)) * 0.5
    rho = 0.5

    def make(n: int, norm_sigma: float) -> np.ndarray:
        out = np.empty((n, sum(sizes)), np.float32)
        for s in range(0, n, 200_000):  # chunks keep peak memory near the output size
            m = min(200_000, n - s)
            parts, prev = [], None
            for c in centres:
                z = rng.choice(n_topics, size=m, p=topic_p)
                noise = rng.standard_normal((m, c.shape[1]))
                lat = np.sqrt(topic_share) * c[z] + np.sqrt(1 - topic_share) * noise
                if prev is not None and prev.shape[1] == lat.shape[1]:
                    lat = rho * prev + np.sqrt(1 - rho**2) * lat
                parts.append(lat)
                prev = lat
            x = np.concatenate(parts, axis=1) * rng.lognormal(0.0, norm_sigma, (m, 1))
            out[s : s + m] = (x + offset).astype(np.float32)
        return out

    return make(n_items, 0.3), make(n_users, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--index", choices=["hnsw", "ivf"], required=True)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", default=None, help="ef_search or nprobe values to measure")
    ap.add_argument("--topic-share", type=float, default=0.7, help="variance share of topics")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    faiss.omp_set_num_threads(args.threads)  # build + exact search use both cores
    third = args.dim // 3
    sizes = (args.dim - 2 * third, third, third)  # (22, 21, 21) at 64 dims
    t = time.perf_counter()
    items, users = topic_vectors(args.items, args.queries, sizes, args.topic_share)
    gen_s = time.perf_counter() - t

    cfg = BuildConfig(index=args.index)
    t = time.perf_counter()
    index = FaissIndex.build(items, cfg.faiss_spec(), progress=True)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        t = time.perf_counter()
        info = index.save(Path(tmp))
        write_s = time.perf_counter() - t
        nbytes = info["bytes"]

    grid = weight_grid(3)
    k = args.k
    queries, exact = [], []
    t = time.perf_counter()
    for w in grid:  # exact top-k once per weighting, reused across the sweep
        q = np.ascontiguousarray(users * slice_scale(w, sizes), dtype=np.float32)
        queries.append(q)
        exact.append(exact_topk(items, q, k)[0])
    exact_s = time.perf_counter() - t

    knob = "ef_search" if args.index == "hnsw" else "nprobe"
    default = info["search_params"][knob]
    sweep = (
        [int(v) for v in args.sweep.split(",")]
        if args.sweep
        else ([64, 128, 256, 512] if args.index == "hnsw" else [16, 32, 64, 128])
    )
    rows = []
    for value in sorted(set(sweep) | {default}):
        index.set_search_params({knob: value})
        recalls = []
        for q, ex in zip(queries, exact, strict=True):
            _, found = index.search(q, k)
            recalls.append(float(recall_with_ties(items, q, found, ex).mean()))
        # single-query latency on one thread, as the service searches
        # (docs/design.md#performance-facts)
        faiss.omp_set_num_threads(1)
        q = queries[0]
        lat = []
        for i in range(min(300, len(q))):
            t0 = time.perf_counter()
            index.search(q[i : i + 1], k)
            lat.append(time.perf_counter() - t0)
        faiss.omp_set_num_threads(args.threads)
        rows.append(
            {
                knob: value,
                "recall_by_weights": dict(zip([str(list(w)) for w in grid], recalls, strict=True)),
                "min_recall": min(recalls),
                "plain_recall": recalls[-1],  # <1,1,1>: unscaled query
                "p50_ms": 1e3 * float(np.median(lat)),
                "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            }
        )
        print(json.dumps(rows[-1]))

    result = {
        "index": args.index,
        "items": args.items,
        "dim": args.dim,
        "topic_share": args.topic_share,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "build_params": info["build_params"],
        "centered": info["item_offset"] is not None,
        "generate_seconds": round(gen_s, 1),
        "train_seconds": info["train_seconds"],
        "build_seconds": round(build_s, 1),
        "write_seconds": round(write_s, 1),
        "exact_topk_seconds": round(exact_s, 1),
        "index_bytes": nbytes,
        "bytes_per_item": round(nbytes / args.items, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sweep": rows,
        "faiss": faiss.__version__,
    }
    name = f"index-build-{args.index}" + (
        f"-w{args.topic_share}" if args.topic_share != 0.7 else ""
    )  # bench/results/index-build.md sums the runs up
    write_json(Path(args.out) / f"{name}.json", {"command": script_command(__file__), **result})
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}))


if __name__ == "__main__":
    main()
