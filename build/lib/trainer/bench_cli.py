"""``csmf bench quality``: every method of :mod:`trainer.baselines` over several seeds → one table
(Recall@N / nDCG@N on test clicks and conversions, mean ± std) plus the serving cost of each
method's representation, measured side by side with ``faiss.IndexFlatIP``.

    csmf bench quality --data data/ml-100k --seeds 3
    python -m trainer.bench_cli quality --data data/ml-100k --seeds 3

writes ``bench/results/quality-<dataset>.md`` and ``.json``. Per-(method, seed) results are cached
in ``runs/bench-<dataset>/<method>/seed<k>.json`` so an interrupted run resumes (``--retrain``
ignores the cache). Serving latency uses the vectors of the first seed trained in this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from csmf.errors import CsmfError
from trainer.baselines import METHODS, MethodRun, run_method
from trainer.config import load_config
from trainer.pipeline import prepare, write_json
from trainer.report import aggregate
from trainer.sensitivity import app as sensitivity_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CSMF benchmarks.")

TARGETS = ("click", "conversion")


@app.callback()
def _group() -> None:
    """CSMF benchmarks: quality table, sensitivity sweeps (validation split)."""


app.add_typer(sensitivity_app, name="sensitivity")


# indexes a method searches per query, as multiples of model.out_dim
SERVING_BLOCKS = {m: [1] for m in METHODS} | {
    "sep": [1, 1],
    "mmoe": [3],
    "popularity": [],
    "oracle": [],
}


def random_serving(method: str, dim: int, n_users: int, n_items: int, cfg) -> MethodRun:
    """Stand-in vectors with the method's serving layout (for runs loaded from the cache)."""
    g = torch.Generator().manual_seed(0)
    weights = dict(zip(cfg.objectives, cfg.eval.weights, strict=True))
    blocks = SERVING_BLOCKS[method]
    ws = [weights.get("click", 1.0), weights.get("conversion", 1.0)] if len(blocks) > 1 else [1.0]
    serving = [
        (torch.randn(n_users, b * dim, generator=g), torch.randn(n_items, b * dim, generator=g), w)
        for b, w in zip(blocks, ws, strict=True)
    ]
    return MethodRun(method, {}, 0.0, serving, vectors="random")


def serving_cost(runs: dict[str, MethodRun], n: int, queries: int = 500, repeat: int = 3) -> dict:
    """Per method: dims/bytes per item, index bytes, mean top-n latency per query (1 thread).

    Each query searches every index of the method (one per entry of ``serving``); with more than
    one index the per-index top-n lists are merged (weighted scores, max per item, top n) —
    the merge is timed too.
    """
    import faiss

    faiss.omp_set_num_threads(1)
    out = {}
    for method, run in runs.items():
        if not run.serving:
            continue
        indexes, qs, ws = [], [], []
        for q, v, w in run.serving:
            items = np.ascontiguousarray(v.numpy(), dtype=np.float32)
            index = faiss.IndexFlatIP(items.shape[1])
            index.add(items)
            indexes.append(index)
            qs.append(np.ascontiguousarray(q.numpy()[:queries], dtype=np.float32))
            ws.append(w)
        k = min(n, indexes[0].ntotal)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            for i in range(len(qs[0])):
                if len(indexes) == 1:
                    indexes[0].search(qs[0][i : i + 1], k)
                    continue
                ids, scores = [], []
                for index, qq, w in zip(indexes, qs, ws, strict=True):
                    s, j = index.search(qq[i : i + 1], k)
                    ids.append(j[0])
                    scores.append(s[0] * w)
                ids_all, sc = np.concatenate(ids), np.concatenate(scores)
                order = np.argsort(-sc, kind="stable")
                _, first = np.unique(ids_all[order], return_index=True)
                keep = order[np.sort(first)][:k]  # best score per item, best first
                _ = ids_all[keep]
            best = min(best, (time.perf_counter() - start) / len(qs[0]))
        dims = sum(ix.d for ix in indexes)
        out[method] = {
            "indexes": len(indexes),
            "dims_per_item": dims,
            "bytes_per_item": 4 * dims,
            "index_bytes": sum(4 * ix.d * ix.ntotal for ix in indexes),
            "items": indexes[0].ntotal,
            "latency_us_per_query": best * 1e6,
            "queries": len(qs[0]),
            "vectors": run.vectors,
        }
    return out


def _rows(agg: dict) -> list[tuple[str, str]]:
    return [(m, r) for m in agg for r in agg[m][TARGETS[0]]]


def markdown(
    dataset: str, agg: dict, cost: dict, n: int, seeds: dict, seconds: dict, cmd: str
) -> str:
    head = ["method", "ranker"] + [f"{t} {m}@{n}" for t in TARGETS for m in ("Recall", "nDCG")]
    lines = [f"# Retrieval quality on {dataset}", "", f"`{cmd}`", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, ranker in _rows(agg):
        cells = [
            "{:.4f} ± {:.4f}".format(*agg[method][t][ranker][m])
            for t in TARGETS
            for m in ("recall", "ndcg")
        ]
        lines.append(f"| {method} | {ranker} | " + " | ".join(cells) + " |")
    same = len({tuple(v) for v in seeds.values()}) == 1
    where = next(iter(seeds.values())) if same else "; ".join(f"{m} {v}" for m, v in seeds.items())
    lines += ["", f"seeds {where}; mean ± std (population) over seeds; test split."]
    lines += [
        "Train+eval seconds per seed: "
        + "; ".join(f"{m} {', '.join(f'{s:.0f}' for s in v)}" for m, v in seconds.items()),
        "",
        f"## Serving cost (faiss.IndexFlatIP, float32, 1 thread, top-{n}, one query at a time)",
        "",
        "| method | indexes | dims/item | bytes/item | index bytes | µs/query | vectors |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, c in cost.items():
        lines.append(
            f"| {m} | {c['indexes']} | {c['dims_per_item']} | {c['bytes_per_item']} | "
            f"{c['index_bytes']:,} | {c['latency_us_per_query']:.1f} | {c['vectors']} |"
        )
    lines += [
        "",
        "CSMF variants and MMoE search one index with the fused query (MMoE's is 3x wider); "
        "Sep searches two 64-dim indexes and merges the two top-N lists by weighted score. "
        "Latency is the best of 3 passes over the first 500 users, merge included; vectors are "
        "the trained ones of the first seed trained in this process, or same-shape random ones "
        "for runs loaded from the cache (flat inner-product search cost does not depend on values).",
    ]
    return "\n".join(lines) + "\n"


@app.command("quality")
def quality(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder.")] = Path("data/ml-100k"),
    seeds: Annotated[int, typer.Option("--seeds", help="Number of seeds (0..N-1).")] = 3,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help=f"Comma-separated subset of {','.join(METHODS)} (default: all; oracle only "
            "for datasets with a truth.npz).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML config (default configs/<dataset>.toml)."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for quality-<dataset>.md/json.")
    ] = Path("bench/results"),
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Per-run cache (default runs/bench-<dataset>).")
    ] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Ignore cached runs.")] = False,
    cached_only: Annotated[
        bool,
        typer.Option(
            "--cached-only", help="Train nothing: tabulate the cached (method, seed) runs."
        ),
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override section.key=value.")
    ] = None,
) -> None:
    """Train and evaluate every method for each seed; write the comparison table."""
    dataset = data.resolve().name
    config = config or Path(f"configs/{dataset}.toml")
    cache = cache or Path(f"runs/bench-{dataset}")
    has_truth = (data / "truth.npz").exists()
    if methods is None:
        names = [m for m in METHODS if m != "oracle" or has_truth]
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        typer.echo(f"error: unknown method(s) {bad}; expected {list(METHODS)}", err=True)
        raise typer.Exit(2)
    seed_list = list(range(seeds))
    results: dict[str, list[dict]] = {m: [] for m in names}
    seconds: dict[str, list[float]] = {m: [] for m in names}
    serving: dict[str, MethodRun] = {}
    n = 50
    try:
        for seed in seed_list:
            cfg = load_config(config, [*(set_ or []), f"train.seed={seed}"])
            n = cfg.eval.n
            enc = prepare(cfg, data)
            for m in names:
                path = cache / m / f"seed{seed}.json"
                if path.exists() and not retrain:
                    rec = json.loads(path.read_text())
                elif cached_only:
                    continue
                else:
                    typer.echo(f"seed {seed}: {m} ...")
                    run = run_method(m, cfg, enc, log=lambda _: None, data=data)
                    rec = {"seed": seed, "seconds": run.seconds, **run.result}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json(path, rec)
                    serving.setdefault(m, run)
                    typer.echo(
                        f"seed {seed}: {m} {run.seconds:.0f}s "
                        + ", ".join(
                            f"{r} {rec['metrics']['click'][r]['recall']:.4f}/"
                            f"{rec['metrics']['conversion'][r]['recall']:.4f}"
                            for r in rec["metrics"]["click"]
                        )
                    )
                results[m].append(rec)
                seconds[m].append(rec["seconds"])
    except CsmfError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    names = [m for m in names if results[m]]
    if not names:
        typer.echo("error: no runs to tabulate", err=True)
        raise typer.Exit(2)
    agg = {m: aggregate(results[m]) for m in names}
    seeds_of = {m: [r["seed"] for r in results[m]] for m in names}
    for m in names:  # cached runs: same-shape random vectors (flat-IP cost ignores the values)
        if m not in serving and SERVING_BLOCKS[m]:
            serving[m] = random_serving(m, cfg.model.out_dim, enc.n_users, enc.n_items, cfg)
    cost = serving_cost(serving, n)
    cmd = f"csmf bench quality --data {data} --seeds {seeds}"
    if methods is not None:
        cmd += f" --methods {methods}"
    for s in set_ or []:
        cmd += f" --set {s}"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(dataset, agg, cost, n, seeds_of, seconds, cmd)
    md, js = out / f"quality-{dataset}.md", out / f"quality-{dataset}.json"
    md.write_text(text)
    write_json(
        js,
        {
            "dataset": dataset,
            "config": str(config),
            "command": cmd,
            "n": n,
            "seeds": seeds_of,
            "seconds": seconds,
            "metrics": agg,
            "per_seed": results,
            "serving": cost,
        },
    )
    typer.echo(text)
    typer.echo(f"wrote {md} and {js}")


if __name__ == "__main__":
    app()
