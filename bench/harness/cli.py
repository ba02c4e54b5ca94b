"""``csmf bench quality``: every method of :mod:`trainer.baselines` over several seeds → one table
(Recall@N / nDCG@N on test clicks and conversions, mean ± std) plus the serving cost of each
method's representation, measured side by side with ``faiss.IndexFlatIP``.

    csmf bench quality --data data/ml-100k --seeds 3

writes ``bench/results/quality-<dataset>.md`` and ``.json``. Per-(method, seed) results are cached
in ``runs/bench-<dataset>/<method>/seed<k>-<key>.json``, the key covering the resolved config, the
dataset's content, the method, the seed and the method's code (:mod:`bench.harness.cache`): an
identical second run reuses every result, a changed ``--set``/config/dataset/code re-runs
(``--retrain`` ignores the cache). Each run trains in a fresh process (:mod:`bench.harness.run`)
so its wall time and peak memory are its own (``--no-isolate``: in this process, memory not
measured). Serving latency is measured here, one method after another, on same-shape vectors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

import csmf.objectives as funnel
from bench.harness.cache import bench_fingerprint, cache_key
from bench.harness.report import METRICS, aggregate
from bench.harness.run import record, run_in_process, run_isolated
from bench.harness.sensitivity import app as sensitivity_app
from csmf.atomic import write_json
from csmf.cli import Seeds, fail, new_app
from csmf.errors import CsmfError
from csmf.results import finish_run, pm, run_info, run_line, table, write_results
from trainer.baselines import METHODS, MethodRun
from trainer.cf_baselines import CF_METHODS, DETERMINISTIC
from trainer.config import RunConfig, load_config
from trainer.pipeline import prepare

app = new_app(no_args_is_help=True, help="CSMF benchmarks.")

TARGETS = funnel.TARGETS


@app.callback()
def _group() -> None:
    """CSMF benchmarks: quality table, sensitivity sweeps (validation split)."""


app.add_typer(sensitivity_app, name="sensitivity")


def random_serving(method: str, layout: list[dict], queries: int = 500) -> MethodRun:
    """Stand-in vectors with a run's serving layout ({dims, items, weight} per index): flat
    inner-product search cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    serving = [
        (
            torch.randn(queries, x["dims"], generator=g),
            torch.randn(x["items"], x["dims"], generator=g),
            x["weight"],
        )
        for x in layout
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def training_cost(results: dict[str, list[dict]]) -> dict:
    """Per method: mean ± std over seeds of train / tuning / total seconds and peak memory."""
    out = {}
    for m, recs in results.items():
        row = {
            k: _mean_std([r.get(k, 0.0) for r in recs])
            for k in ("train_seconds", "tune_seconds", "seconds")
        }
        mems = [r["memory"] for r in recs if r.get("memory")]
        for k in ("peak_extra_mb", "peak_rss_mb"):
            row[k] = _mean_std([x[k] for x in mems]) if mems else None
        row["memory_measured"] = mems[0]["measured"] if mems else None
        out[m] = row
    return out


def hyperparameters(results: dict[str, list[dict]]) -> dict:
    """Per tuned method: per seed, the chosen values and their validation metrics."""
    out = {}
    for m, recs in results.items():
        tuned = [r for r in recs if r.get("tuning")]
        if tuned:
            out[m] = {
                "selection": tuned[0]["tuning"]["selection"],
                "grid": tuned[0]["tuning"]["grid_spec"],
                "deterministic": tuned[0]["tuning"]["deterministic"],
                "per_seed": [
                    {
                        "seed": r["seed"],
                        "params": r["tuning"]["params"],
                        "criterion": r["tuning"]["criterion"],
                        "validation": r["tuning"]["validation"],
                    }
                    for r in tuned
                ],
            }
    return out


def markdown(
    agg: dict,
    cost: dict,
    train: dict,
    hyper: dict,
    n: int,
    seeds: dict,
) -> list[str]:
    """The results page's body (csmf.results.write_results adds the title and the command)."""
    head = ["method", "ranker"] + [f"{t} {m}@{n}" for t in TARGETS for m in ("Recall", "nDCG")]
    lines = table(
        head,
        (
            [method, ranker, *(pm(agg[method][t][ranker][m]) for t in TARGETS for m in METRICS)]
            for method, ranker in _rows(agg)
        ),
    )
    same = len({tuple(v) for v in seeds.values()}) == 1
    where = next(iter(seeds.values())) if same else "; ".join(f"{m} {v}" for m, v in seeds.items())
    lines += ["", f"seeds {where}; mean ± std (population) over seeds; test split."]
    det = [m for m, h in hyper.items() if h["deterministic"]]
    if det:
        lines.append(f"{', '.join(det)}: deterministic (the same model for every seed, std 0).")
    lines += [
        "",
        f"## Cost (training: own process per run; serving: faiss.IndexFlatIP, float32, 1 thread, "
        f"top-{n}, one query at a time)",
        "",
    ]
    rows = []
    for m, t in train.items():
        c = cost.get(m)
        serve = (
            [c["indexes"], c["dims_per_item"], c["bytes_per_item"], f"{c['index_bytes']:,}",
             f"{c['latency_us_per_query']:.1f}"]
            if c
            else [0, 0, 0, 0, "n/a"]
        )  # fmt: skip
        tune = pm(t["tune_seconds"], ".1f") if m in hyper else "—"
        rows.append(
            [m, pm(t["train_seconds"], ".2f"), tune, pm(t["peak_extra_mb"], ".0f"),
             pm(t["peak_rss_mb"], ".0f"), *serve]
        )  # fmt: skip
    lines += table(
        ["method", "train s", "tuning s", "peak extra MB", "peak RSS MB", "indexes", "dims/item",
         "bytes/item", "index bytes", "µs/query"],
        rows,
    )  # fmt: skip
    measured = next((t["memory_measured"] for t in train.values() if t["memory_measured"]), None)
    lines += [
        "",
        "Train s: building the evaluated model (CSMF family: the whole cascade; CF baselines: "
        "the chosen grid point alone — ALS/BPR's sweeps up to the chosen count, ItemKNN's "
        "similarity + top-k). Tuning s: the CF baselines' whole validation grid search (— = no "
        "automatic search: CSMF's configuration was chosen by hand on validation, not timed). "
        "Peak memory: resident set of a fresh process running only that method — "
        + (measured or "not measured (--no-isolate)")
        + "; 'extra' is above the RSS after imports and data loading. "
        "Latency: best of 3 passes over 500 queries, merge included, on same-shape random "
        "vectors (flat inner-product search cost does not depend on the values). CSMF variants "
        "and MMoE search one index with the fused query (MMoE's is 3x wider); Sep searches two "
        "indexes and merges the two top-N lists by weighted score; EASE and ItemKNN serve the "
        "user's interaction row against the item-item matrix (n_items dims per item); BPR has "
        "implicit's item-bias column (+1 dim).",
    ]
    if hyper:
        lines += [
            "",
            f"## Hyper-parameters chosen on the validation split (criterion: mean over click and "
            f"conversion of (Recall@{n} + nDCG@{n}) / 2)",
            "",
        ]
        rows = []
        for m, h in hyper.items():
            for r in h["per_seed"]:
                params = ", ".join(f"{k}={v:g}" for k, v in r["params"].items())
                val = r["validation"]
                cells = [
                    f"{val[t]['recall']:.4f} / {val[t]['ndcg']:.4f}" if t in val else "n/a"
                    for t in TARGETS
                ]
                rows.append([m, r["seed"], params, f"{r['criterion']:.4f}", *cells])
        head = ["method", "seed", "chosen", "val criterion"]
        lines += table(head + [f"val {t} R/nDCG" for t in TARGETS], rows)
        lines += ["", "Grids (trainer/cf_baselines.py GRIDS):"]
        for m, h in hyper.items():
            lines.append(f"- {m}: " + "; ".join(f"{k} {v}" for k, v in h["grid"].items()))
    return lines


def command(
    data: Path, config: Path, seeds: int, methods: str | None, sets: list[str], isolate: bool
) -> str:
    """The one command that reproduces the table (every option that affects a number)."""
    cmd = f"csmf bench quality --data {data} --config {config} --seeds {seeds}"
    if methods is not None:
        cmd += f" --methods {methods}"
    for s in sets:
        cmd += f" --set {s}"
    if not isolate:
        cmd += " --no-isolate"
    return cmd


# Methods whose result does not depend on the seed (no randomness): trained once, at seed 0.
SEED_FREE = frozenset(
    {"popularity", "oracle"} | {m for m, (model, _) in CF_METHODS.items() if model in DETERMINISTIC}
)


def method_names(data: Path, methods: str | None) -> list[str]:
    """``--methods`` (or every method; oracle only for datasets with a truth.npz), checked."""
    if methods is None:
        return [m for m in METHODS if m != "oracle" or (data / "truth.npz").exists()]
    names = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        fail(f"unknown method(s) {bad}; expected {list(METHODS)}")
    return names


@dataclass
class Collected:
    """Every (method, seed) record of a run of the benchmark, cached or new."""

    results: dict[str, list[dict]]
    serving: dict[str, MethodRun]  # in-process runs only (--no-isolate)
    hits: int
    fingerprint: str
    cfg: RunConfig  # the last seed's resolved config
    n: int


def collect(
    data: Path,
    config: Path,
    cache: Path,
    names: list[str],
    seeds: int,
    sets: list[str],
    retrain: bool = False,
    cached_only: bool = False,
    isolate: bool = True,
) -> Collected:
    """Seed by seed, method by method: reuse the cached record whose key matches
    (:mod:`bench.harness.cache`), else train (in a fresh process unless ``isolate`` is false)
    and cache it. Seed 0 of an isolated run also keeps its serving vectors (``.npz``). Methods
    in :data:`SEED_FREE` run at seed 0 only; their record stands for every seed."""
    results: dict[str, list[dict]] = {m: [] for m in names}
    serving: dict[str, MethodRun] = {}
    n, hits = 50, 0
    try:
        fingerprint = bench_fingerprint(data)
        for seed in range(seeds):
            cfg = load_config(config, [*sets, f"train.seed={seed}"])
            n = cfg.eval.n
            enc = None
            for m in names:
                if seed > 0 and m in SEED_FREE and results[m] and results[m][0]["seed"] == 0:
                    # the same model for every seed: seed 0's record stands for the others
                    results[m].append({**results[m][0], "seed": seed, "same_as_seed": 0})
                    continue
                key, parts = cache_key(cfg, fingerprint, m, seed)
                path = cache / m / f"seed{seed}-{key[:16]}.json"
                if path.exists() and not retrain:
                    rec = json.loads(path.read_text())
                    hits += 1
                elif cached_only:
                    continue
                else:
                    typer.echo(f"seed {seed}: {m} ...")
                    if isolate:  # seed 0 keeps its serving vectors (bench/table4.py)
                        vectors = path.with_suffix(".npz") if seed == 0 else None
                        rec = run_isolated(m, cfg, data, vectors)
                    else:
                        enc = enc or prepare(cfg, data)
                        run = run_in_process(m, cfg, enc, data)
                        rec = record(run, seed)
                        serving.setdefault(m, run)
                    rec.update(key=key, key_parts={k: v for k, v in parts.items() if k != "config"})
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json(path, rec)
                    typer.echo(_summary(m, seed, rec))
                results[m].append(rec)
    except (CsmfError, FileNotFoundError) as exc:
        fail(exc)
    return Collected(results, serving, hits, fingerprint, cfg, n)


@app.command("quality")
def quality(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder.")] = Path("data/ml-100k"),
    seeds: Seeds = 3,
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
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate/--no-isolate",
            help="Run each (method, seed) in a fresh process and measure its peak memory "
            "(default); --no-isolate runs in this process (faster to start, memory not measured).",
        ),
    ] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Config override section.key=value."),
    ] = None,
) -> None:
    """Train and evaluate every method for each seed; write the comparison table."""
    dataset = data.resolve().name
    config = config or Path(f"configs/{dataset}.toml")
    cache = cache or Path(f"runs/bench-{dataset}")
    names = method_names(data, methods)
    runs = collect(data, config, cache, names, seeds, set_ or [], retrain, cached_only, isolate)
    results, serving, hits, fingerprint, cfg, n = (
        runs.results,
        runs.serving,
        runs.hits,
        runs.fingerprint,
        runs.cfg,
        runs.n,
    )
    names = [m for m in names if results[m]]
    if not names:
        fail("no runs to tabulate")
    results = {m: results[m] for m in names}
    agg = {m: aggregate(results[m]) for m in names}
    seeds_of = {m: [r["seed"] for r in results[m]] for m in names}
    for m in names:  # isolated or cached runs: same-shape stand-ins
        if m not in serving and results[m][0]["serving"]:
            serving[m] = random_serving(m, results[m][0]["serving"])
    cost = serving_cost(serving, n)
    train = training_cost(results)
    hyper = hyperparameters(results)
    cmd = command(data, config, seeds, methods, set_ or [], isolate)
    resolved = cfg.to_dict()  # train.seed: one run per seed
    out.mkdir(parents=True, exist_ok=True)
    body = markdown(agg, cost, train, hyper, n, seeds_of)
    md, js = write_results(
        out / f"quality-{dataset}",
        f"Retrieval quality on {dataset}",
        cmd,
        body,
        {
            "dataset": dataset,
            "dataset_fingerprint": fingerprint,
            "config": str(config),
            "resolved_config": {
                **resolved,
                "train": {**resolved["train"], "seed": list(range(seeds))},
            },
            "n": n,
            "seeds": seeds_of,
            "seconds": {m: [r["seconds"] for r in results[m]] for m in names},
            "metrics": agg,
            "hyperparameters": hyper,
            "training_cost": train,
            "serving": cost,
            "cache": {"folder": str(cache), "hits": hits, "runs": sum(map(len, results.values()))},
            "per_seed": {m: [_slim(r) for r in results[m]] for m in names},
        },
    )
    typer.echo("\n".join(body))
    typer.echo(f"wrote {md} and {js} ({hits} cached runs reused)")


# The rows of the paper's Table 2 on each dataset (the CF baselines tuned on validation).
TABLE2_METHODS = (
    "csmf", "sep", "mix", "mvke", "dmmp", "dtml", "moppr", "popularity", "ease-click",
    "itemknn-click", "rp3beta-click", "als-click",
)  # fmt: skip


# The code a run executes: a results header's commit says "+ uncommitted changes" if it differs.
CODE = ("csmf", "trainer", "bench/harness")


@app.command("table2")
def table2(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder.")] = Path("data/ml-100k"),
    seeds: Seeds = 5,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML config (default configs/<dataset>.toml)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for table2-<dataset>.md/json.")] = Path(
        "bench/results"
    ),
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Per-run cache (default runs/bench-<dataset>).")
    ] = None,
    cached_only: Annotated[
        bool, typer.Option("--cached-only", help="Train nothing: tabulate the cached runs.")
    ] = False,
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="Rows (default: the table's; oracle if truth.npz)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Config override section.key=value."),
    ] = None,
) -> None:
    """The paper's Table 2: every multi-objective and CF method, one row each, mean ± std over
    seeds, bold best, paired test of CSMF against the best other row of each column. Shares
    ``csmf bench quality``'s cache (same keys)."""
    from bench.harness.paper_tables import render

    info = run_info(watched=CODE)

    dataset = data.resolve().name
    config = config or Path(f"configs/{dataset}.toml")
    cache = cache or Path(f"runs/bench-{dataset}")
    names = list(TABLE2_METHODS) if methods is None else method_names(data, methods)
    if methods is None and (data / "truth.npz").exists():
        names.insert(names.index("popularity") + 1, "oracle")
    runs = collect(data, config, cache, names, seeds, set_ or [], cached_only=cached_only)
    results = {m: r for m, r in runs.results.items() if r}
    if "csmf" not in results:
        fail("no CSMF runs to compare against")
    body, doc = render(results, runs.n)
    train = training_cost(results)
    info = finish_run(info)
    body += [
        "",
        f"## Training wall time ({'threads ' + str(runs.cfg.train.threads)}; own process per "
        "run; tuning excluded)",
        "",
        *table(
            ["method", "train s", "CF validation grid s"],
            [
                [
                    m,
                    pm(t["train_seconds"], ".1f"),
                    pm(t["tune_seconds"], ".1f") if t["tune_seconds"][0] else "—",
                ]
                for m, t in train.items()
            ],
        ),  # fmt: skip
        "",
        f"Runs cached in `{cache}` ({runs.hits} of {sum(map(len, results.values()))} reused by "
        f"this rendering). Rendered: {run_line(info)}",
    ]
    cmd = f"csmf bench table2 --data {data} --config {config} --seeds {seeds}"
    cmd += f" --methods {methods}" if methods is not None else ""
    cmd += "".join(f" --set {s}" for s in set_ or [])
    md, js = write_results(
        out / f"table2-{dataset}",
        f"Table 2 on {dataset}: retrieval quality of the paper's methods",
        cmd,
        body,
        {
            "dataset": dataset,
            "dataset_fingerprint": runs.fingerprint,
            "config": str(config),
            "n": runs.n,
            "seeds": {m: [r["seed"] for r in recs] for m, recs in results.items()},
            **doc,
            "training_cost": train,
            "run": info,
            "cache": {"folder": str(cache), "hits": runs.hits},
        },
    )
    typer.echo("\n".join(body))
    typer.echo(f"wrote {md} and {js}")


def _slim(rec: dict) -> dict:
    """A per-seed record without the full validation grid (kept in the cache file)."""
    if "tuning" not in rec:
        return rec
    return {**rec, "tuning": {k: v for k, v in rec["tuning"].items() if k != "grid"}}


def _summary(m: str, seed: int, rec: dict) -> str:
    mem = rec.get("memory")
    peak = f", peak +{mem['peak_extra_mb']:.0f} MB" if mem else ""
    metrics = rec["metrics"]
    return f"seed {seed}: {m} {rec['seconds']:.0f}s{peak} " + ", ".join(
        f"{r} " + "/".join(f"{metrics[t][r]['recall']:.4f}" for t in TARGETS)
        for r in metrics[TARGETS[0]]
    )


if __name__ == "__main__":
    app()
