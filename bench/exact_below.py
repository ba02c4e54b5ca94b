"""Where IVF's exact-search fallback for selective filters should switch, by catalogue size.

    .venv/bin/python bench/exact_below.py --items 100000 --items 1000000

For each bench bundle (bench/serve_data.py: the serving benchmark's catalogue, IVF, the builder's
nprobe; ``--tune`` as bench/serve.py --tune) and each filter share, the median CPU ms of one
filtered search (k=50, one thread, OPENBLAS_NUM_THREADS=1 as served) through the two paths the
index can take: the exact search over the allowed rows, and IVF with nprobe widened by 1/share.
The index's default ``exact_below`` (``csmf.index.faiss.auto_exact_below``) is printed beside:
it should sit at or below the crossover. Writes bench/results/exact-below.{md,json}.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from csmf.bundle import load_bundle  # noqa: E402
from csmf.index.base import RowSet, Where  # noqa: E402
from csmf.index.faiss import auto_exact_below  # noqa: E402
from csmf.results import (  # noqa: E402
    finish_run,
    run_info,
    run_line,
    script_command,
    table,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SHARES = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07)


def measure(bundle: Path, shares, queries: int, seed: int = 0) -> dict:
    faiss.omp_set_num_threads(1)
    index = load_bundle(bundle, verify=False).index
    n = len(index)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((queries, index.dim)).astype(np.float32)
    nprobe = int(index.search_params.get("nprobe", 0))
    out = {"items": n, "nprobe": nprobe, "nlist": index._nlist, "rows": []}
    out["auto_exact_below"] = auto_exact_below(index.kind, nprobe, index._nlist)
    configured = index.exact_below
    try:
        for share in shares:
            allowed = RowSet(rng.random(n) < share)
            allowed.rows, allowed.bits  # noqa: B018 - built once per filter, as the service caches
            where = Where(allowed=allowed)
            ms = {}
            for path, below in (("exact", 1.0), ("widened", 0.0)):
                index.exact_below = below
                index.search(q[:1], 50, where)  # warm
                times = []
                for i in range(queries):
                    t = time.process_time()
                    index.search(q[i : i + 1], 50, where)
                    times.append(time.process_time() - t)
                ms[path] = float(np.median(times) * 1e3)
            out["rows"].append({"share": share, **ms})
            print(f"{n} items, share {share}: {ms}", flush=True)
    finally:
        index.exact_below = configured
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, action="append", help="catalogue sizes (repeatable)")
    ap.add_argument("--shares", default=",".join(map(str, SHARES)))
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--tune", action="store_true", help="the tuned-nprobe bundle (see serve.py)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "exact-below")
    args = ap.parse_args()
    from serve_data import bench_bundle

    shares = [float(s) for s in args.shares.split(",")]
    info = run_info()
    runs = []
    for n in args.items or [100_000]:
        runs.append(measure(bench_bundle(n, args.cache, tune=args.tune), shares, args.queries))
    info = finish_run(info)
    body = [
        "Median CPU ms of one filtered search (k=50, one thread) through each path, per share of "
        "the catalogue the filter allows; **bold** = the path the index takes by default "
        "(`auto_exact_below`: 0.2·sqrt(nprobe/nlist), within [0.2 %, 5 %]). "
        f"{run_line(info)} A shared machine: compare the two paths within a row.",
        "",
    ]
    for r in runs:
        auto = r["auto_exact_below"]
        body += [
            f"## {r['items']:,} items (IVF nlist {r['nlist']}, nprobe {r['nprobe']}): "
            f"default exact below {auto:.2%}",
            "",
        ]
        rows = []
        for x in r["rows"]:
            e, w = f"{x['exact']:.2f}", f"{x['widened']:.2f}"
            e, w = (f"**{e}**", w) if x["share"] <= auto else (e, f"**{w}**")
            rows.append([f"{x['share']:.1%}", e, w])
        body += table(["allowed share", "exact ms", "widened IVF ms"], rows) + [""]
    md, _ = write_results(
        args.out,
        "Selective filters: exact search or widened IVF, by catalogue size",
        script_command(__file__),
        body,
        {"run": info, "runs": runs},
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
