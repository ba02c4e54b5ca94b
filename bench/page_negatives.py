"""CSMF with and without the paper's exposure-stage page-view negatives (``loss.page_negatives``):
items shown but not clicked in the example's own page view, besides the in-batch negatives.

    python bench/page_negatives.py --data data/synth --config configs/synthetic.toml \\
        --seeds 3 --page-negatives 3 --set train.threads=1

For each seed, trains the cascade twice on the same split (``loss.page_negatives`` = 0 and the
given value; everything else from the config) and scores every view and the fused score on the
validation split and on the test split, Recall@N / nDCG@N on clicks and on conversions. Runs are
interleaved (seed 0 off, seed 0 on, seed 1 off, ...) so machine load hits both arms alike, and
each run is cached under ``runs/bench-page-negatives/`` by the key ``csmf bench quality`` uses
(resolved config, data fingerprint, seed, result-code hash). Writes
``bench/results/page-negatives-<dataset>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.harness.cache import bench_fingerprint, cache_key
from csmf.atomic import write_json
from csmf.checkpoint import new_model
from csmf.results import finish_run, pm, run_info, run_line, script_command, table, write_results
from trainer.cascade import run_cascade
from trainer.config import load_config
from trainer.evaluate import evaluate_model
from trainer.pipeline import prepare

TARGETS = ("click", "conversion")


def one_run(cfg, enc) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    start = time.perf_counter()
    trained = run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
    seconds = time.perf_counter() - start
    out = {"train_seconds": seconds, "stages": trained["stages"]}
    for split, rows in (("val", enc.split.val), ("test", enc.split.test)):
        ev = evaluate_model(model, enc, cfg.objectives, cfg.eval.weights, cfg.eval.n, rows)
        out[split] = ev["metrics"]
    return out


def summarise(runs: list[dict], split: str, ranker: str) -> dict:
    """{target: {metric: (mean, population std)}} over seeds."""
    out = {}
    for t in TARGETS:
        out[t] = {}
        for m in ("recall", "ndcg"):
            xs = [r[split][t][ranker][m] for r in runs]
            out[t][m] = (statistics.fmean(xs), statistics.pstdev(xs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/synth"))
    ap.add_argument("--config", type=Path, default=Path("configs/synthetic.toml"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--page-negatives", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-page-negatives"))
    args = ap.parse_args()
    dataset = args.data.resolve().name
    arms = {"without": 0, "with": args.page_negatives}
    base = load_config(args.config, args.sets)
    enc = prepare(base, args.data)
    fingerprint = bench_fingerprint(args.data)
    args.cache.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    info = run_info()
    load = []  # the 1-minute load when each run that trained started
    for seed in range(args.seeds):
        for arm, p in arms.items():
            sets = [*args.sets, f"loss.page_negatives={p}", f"train.seed={seed}"]
            cfg = load_config(args.config, sets)
            key, _ = cache_key(cfg, fingerprint, "csmf", seed)
            path = args.cache / f"{key}.json"
            if path.exists():
                rec = json.loads(path.read_text())
            else:
                load.append(os.getloadavg()[0])
                rec = {"arm": arm, "seed": seed, "page_negatives": p, **one_run(cfg, enc)}
                write_json(path, rec)
            runs[arm].append(rec)
            fused = rec["val"]["conversion"]["fused"]
            print(f"seed {seed} {arm:8s} val fused conversion R {fused['recall']:.4f}", flush=True)

    rankers = [*base.objectives, "fused"]
    doc: dict = {
        "dataset": dataset,
        "config": str(args.config),
        "page_negatives": args.page_negatives,
        "seeds": list(range(args.seeds)),
        "run": finish_run(info),
        "load_1min_at_run_start": load,
        "summary": {
            s: {a: {r: summarise(runs[a], s, r) for r in rankers} for a in arms}
            for s in ("val", "test")
        },
        "train_seconds": {a: [r["train_seconds"] for r in runs[a]] for a in arms},
        "runs": runs,
    }
    body = [
        f"CSMF on `{dataset}` ({args.config}), seeds 0–{args.seeds - 1}, mean ± std (population)"
        f" over seeds; `loss.page_negatives` = 0 (without) vs {args.page_negatives} (with), "
        f"everything else from the config. {run_line(doc['run'])} 1-minute load when each run "
        f"started: {', '.join(f'{x:.1f}' for x in load) or 'all runs cached'}.",
        "",
    ]
    for split, name in (("val", "Validation split"), ("test", "Test split")):
        body += [f"## {name}", ""]
        rows = []
        for r in rankers:
            for a in arms:
                m = doc["summary"][split][a][r]
                rows.append([r, a, *(pm(m[t][k]) for t in TARGETS for k in ("recall", "ndcg"))])
        body += table(
            ["ranker", "page negatives", "click R@50", "click nDCG@50", "conv R@50",
             "conv nDCG@50"],
            rows,
        )  # fmt: skip
        body.append("")
    secs = {a: statistics.fmean(v) for a, v in doc["train_seconds"].items()}
    body.append(
        "Training time per run (mean): "
        + ", ".join(f"{a} {s:.0f} s" for a, s in secs.items())
        + " (one thread, shared machine: a rough ratio, not a benchmark)."
    )
    stem = Path("bench/results") / f"page-negatives-{dataset}"
    md, _ = write_results(stem, f"Page-view negatives on {dataset}", script_command(__file__),
                          body, doc)  # fmt: skip
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
