"""Where one retrieve request's own Python goes, in process (no HTTP), stage by stage.

    .venv/bin/python bench/serve_inprocess.py --items 1000000 --tune

Builds the app on the bench bundle (bench/serve_data.py) with multiprocess metrics as
``csmf serve --workers 2`` runs them, then answers bench/serve.py's mixed bodies through
``retrieve_json`` (what the fast path calls once the body is read), timing each stage with
``perf_counter`` wrappers, medians over ``--rounds``. Beside it: encode + raw FAISS search
interleaved per request (bench/serve.py's baseline), and the item-JSON render of a 50-item result
hot (the same result again) and after a FAISS search (as in a request) — the cost of caches the
search's scan evicted. Writes bench/results/serve-inprocess.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="csmf-inproc-"))

import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from csmf.results import finish_run, run_info, run_line, script_command, table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = [  # (module, attribute path, label); nested ones are inside Retriever.retrieve
    ("service.routes.retrieve", "parse_retrieve", "parse the body"),
    ("service.scenarios", "Scenarios.resolve", "resolve weights"),
    ("service.retriever", "Retriever.retrieve", "Retriever.retrieve (all of it)"),
    ("service.retriever", "Retriever.user", "  user lookup"),
    ("csmf.user_encoder", "UserEncoder.encode", "  encode"),
    ("csmf.index.faiss", "FaissIndex.search", "  FAISS search (with its wrapper)"),
    ("service.retriever", "Retriever.items_json", "render the items' JSON"),
    ("service.outcomes", "Outcomes.served", "request id + impressions"),
    ("service.outcomes", "Outcomes.count", "request counters"),
]


def _wrap(acc: dict, module: str, path: str, label: str) -> None:
    import importlib

    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    f = getattr(owner, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[label] += time.perf_counter() - t

    setattr(owner, name, timed)  # parse_retrieve: the route module's own name for it


def render_cost(bundle_path: Path, n: int = 500) -> dict:
    from csmf.bundle import load_bundle
    from service.item_json import ItemJson

    b = load_bundle(bundle_path, verify=False)
    ij = ItemJson(b.item_ids.tolist(), b.item_meta)
    q = np.random.default_rng(0).standard_normal((n, b.index.dim)).astype(np.float32)
    res = [b.index.search(q[i : i + 1], 50) for i in range(n)]
    rows = [r[1][0].tolist() for r in res]
    scores = [r[0][0].tolist() for r in res]
    cold, hot = [], []
    for i in range(n):
        b.index.search(q[i : i + 1], 50)  # the scan a request does just before rendering
        t = time.perf_counter()
        ij.render(rows[i], scores[i])
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        ij.render(rows[i], scores[i])
        hot.append(time.perf_counter() - t)
    return {"hot_us": float(np.median(hot) * 1e6), "after_search_us": float(np.median(cold) * 1e6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--tune", action="store_true", help="the tuned-nprobe bundle (see serve.py)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve-inprocess")
    args = ap.parse_args()
    run = run_info(ROOT, ("service", "csmf"))
    faiss.omp_set_num_threads(1)
    from fastapi.testclient import TestClient
    from serve_bodies import make_bodies
    from serve_data import bench_bundle
    from serve_work import in_process

    from service.main import create_app
    from service.settings import Settings

    bundle = bench_bundle(args.items, args.cache, tune=args.tune)
    bodies = make_bodies(bundle, args.items)[:3000]
    acc: dict[str, float] = defaultdict(float)
    for module, path, label in STAGES:
        _wrap(acc, module, path, label)
    from service.routes import retrieve as route

    scenarios = Path(tempfile.mkdtemp(prefix="csmf-inproc-sc-")) / "scenarios.json"
    app = create_app(Settings(bundle=bundle, verify_bundle=False, scenarios_file=scenarios))
    per_round: list[dict[str, float]] = []
    with TestClient(app):
        state = app.state.csmf
        raw = [b.encode() for b in bodies]
        for b in raw[:300]:
            route.retrieve_json(state, b, time.perf_counter())
        for _ in range(args.rounds):
            acc.clear()
            t = time.perf_counter()
            for b in raw:
                route.retrieve_json(state, b, time.perf_counter())
            total = time.perf_counter() - t
            per_round.append(
                {"total": total / len(raw) * 1e6, **{k: v / len(raw) * 1e6 for k, v in acc.items()}}
            )
            print(per_round[-1], flush=True)
    med = {k: float(np.median([r[k] for r in per_round])) for k in per_round[0]}
    inner = ["  user lookup", "  encode", "  FAISS search (with its wrapper)"]
    med["  the rest of Retriever.retrieve"] = med["Retriever.retrieve (all of it)"] - sum(
        med[k] for k in inner
    )
    top = [label for _, _, label in STAGES if not label.startswith("  ")]
    med["retrieve_json's own lines (join, timing)"] = med["total"] - sum(med[k] for k in top)
    base = in_process(bundle, bodies)
    work = med["  encode"] + med["  FAISS search (with its wrapper)"]
    render = render_cost(bundle)
    rows = [[k, f"{v:.1f}"] for k, v in med.items() if k != "total"]
    run = finish_run(run)
    body = [
        f"{args.items:,} items, bundle `{bundle.name}`, {len(bodies):,} mixed bodies of bench/serve.py, "
        f"{args.rounds} rounds, medians. {run_line(run)}",
        "",
        f"**One request through `retrieve_json`: {med['total']:.0f} µs**, of which encode + "
        f"FAISS search {work:.0f} µs (in bench/serve.py's tight loop, its baseline: "
        f"{base['request_us']:.0f} µs interleaved; encode {base['encode_us']:.0f} and search "
        f"{base['search_us']:.0f} in separate loops) and the request's own Python "
        f"{med['total'] - work:.0f} µs.",
        "",
        *table(["stage", "µs / request"], rows),
        "",
        f"Item JSON of a 50-item result: {render['hot_us']:.1f} µs hot (rendered again at once), "
        f"{render['after_search_us']:.1f} µs right after a FAISS search (as in a request): the "
        "difference is caches the search's scan evicted.",
    ]
    md, _ = write_results(
        args.out,
        "Where a retrieve request's own Python goes (in process)",
        script_command(__file__),
        body,
        {
            "items": args.items,
            "stages_us": med,
            "baseline": base,
            "render": render,
            "rounds": per_round,
            "run": run,
        },
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
