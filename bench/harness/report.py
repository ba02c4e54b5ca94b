"""Several seeds → one table (mean ± std): train (or reuse) ``OUT/seed<N>`` for each seed,
evaluate each on its test split, aggregate.

    python -m bench.harness.report --config configs/ml-100k.toml --data data/ml-100k \
        --out runs/ml-100k-seeds --seeds 3

writes ``OUT/report.md`` and ``OUT/report.json`` and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from csmf.checkpoint import CHECKPOINT_NAME
from csmf.cli import Seeds, fail, invoked_command
from csmf.errors import CsmfError
from csmf.results import pm, table, write_results
from trainer.config import load_config
from trainer.pipeline import eval_run, train_run

METRICS = ("recall", "ndcg")


def aggregate(results: list[dict]) -> dict:
    """{target: {ranker: {metric: [mean, std]}}} over runs (population std, ddof=0)."""
    out: dict = {}
    first = results[0]["metrics"]
    for target, rankers in first.items():
        out[target] = {}
        for name in rankers:
            out[target][name] = {}
            for m in METRICS:
                vals = np.array([r["metrics"][target][name][m] for r in results])
                out[target][name][m] = [float(vals.mean()), float(vals.std())]
    return out


def markdown(agg: dict, n: int, seeds: list[int], seconds: list[float]) -> list[str]:
    targets = list(agg)
    head = ["ranker"] + [f"{t} {m}@{n}" for t in targets for m in ("Recall", "nDCG")]
    rows = (
        [name, *(pm(agg[t][name][m]) for t in targets for m in METRICS)] for name in agg[targets[0]]
    )
    train = ", ".join(f"{s:.0f}s" for s in seconds)
    return [
        *table(head, rows),
        "",
        f"seeds {seeds}; mean ± std over seeds; training time per seed: {train}",
    ]


def main(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", help="TOML config.")] = Path(
        "configs/ml-100k.toml"
    ),
    data: Annotated[Path, typer.Option("--data", help="Dataset folder.")] = Path("data/ml-100k"),
    out: Annotated[Path, typer.Option("--out", help="Folder for seed runs and the report.")] = Path(
        "runs/ml-100k-seeds"
    ),
    seeds: Seeds = 3,
    retrain: Annotated[bool, typer.Option("--retrain", help="Retrain existing runs.")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Config override section.key=value."),
    ] = None,
) -> None:
    """Train/evaluate one run per seed and print the mean ± std table."""
    seed_list = list(range(seeds))
    results, seconds = [], []
    try:
        for seed in seed_list:
            run = out / f"seed{seed}"
            if retrain or not (run / CHECKPOINT_NAME).exists():
                cfg = load_config(config, [*(set_ or []), f"train.seed={seed}"])
                _, metrics = train_run(cfg, data, run, log=typer.echo, progress=False, force=True)
            else:
                metrics = json.loads((run / "train_metrics.json").read_text())
            seconds.append(metrics["seconds"])
            results.append(eval_run(run))
    except CsmfError as exc:
        fail(exc)
    agg = aggregate(results)
    body = markdown(agg, results[0]["n"], seed_list, seconds)
    doc = {"seeds": seed_list, "train_seconds": seconds, "metrics": agg}
    md, _ = write_results(out / "report", f"{config} on {data}", invoked_command(ctx), body, doc)
    typer.echo("\n".join(body))
    typer.echo(f"wrote {md}")


if __name__ == "__main__":
    typer.run(main)
