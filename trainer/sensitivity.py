"""Sensitivity of CSMF to one config key (paper Figs. 4-5), scored on the VALIDATION split only.

    python -m trainer.sensitivity --data data/ml-100k --key cascade.tau \
        --values 0.25,0.5,0.75,0.95 --seeds 0

appends to ``bench/results/sensitivity-<dataset>.json`` and rewrites the ``.md`` next to it.
The test split is never touched here: it is reserved for ``csmf bench quality``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from csmf.checkpoint import new_model
from trainer.cascade import run_cascade
from trainer.config import load_config
from trainer.evaluate import evaluate_model
from trainer.pipeline import prepare, write_json


def val_point(config: Path, data: Path, overrides: list[str], seed: int) -> dict:
    cfg = load_config(config, [*overrides, f"train.seed={seed}"])
    enc = prepare(cfg, data)
    torch.manual_seed(seed)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    start = time.perf_counter()
    run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
    res = evaluate_model(model, enc, cfg.objectives, cfg.eval.weights, cfg.eval.n, enc.split.val)
    res["seconds"] = time.perf_counter() - start
    return res


def markdown(points: list[dict]) -> str:
    lines = ["# CSMF sensitivity (validation split, Recall@50 clicks / conversions)", ""]
    lines += [
        "| setting | seeds | exposure | click | conversion | fused |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        cells = []
        for r in ("exposure", "click", "conversion", "fused"):
            c = np.mean([m["click"][r]["recall"] for m in p["metrics"]])
            v = np.mean([m["conversion"][r]["recall"] for m in p["metrics"]])
            cells.append(f"{c:.4f} / {v:.4f}")
        lines.append(f"| {p['setting']} | {p['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(
    data: Annotated[Path, typer.Option("--data")] = Path("data/ml-100k"),
    config: Annotated[Path, typer.Option("--config")] = Path("configs/ml-100k.toml"),
    key: Annotated[str, typer.Option("--key", help="section.key to sweep")] = "cascade.tau",
    values: Annotated[str, typer.Option("--values")] = "0.25,0.5,0.75,0.95",
    seeds: Annotated[str, typer.Option("--seeds")] = "0",
    out: Annotated[Path, typer.Option("--out")] = Path("bench/results"),
) -> None:
    dataset = data.resolve().name
    path = out / f"sensitivity-{dataset}.json"
    points = json.loads(path.read_text())["points"] if path.exists() else []
    seed_list = [int(s) for s in seeds.split(",")]
    for value in values.split(","):
        setting = f"{key}={value}"
        metrics = []
        for seed in seed_list:
            res = val_point(config, data, [setting], seed)
            metrics.append(res["metrics"])
            typer.echo(
                f"{setting} seed {seed}: fused val Recall@50 "
                f"{res['metrics']['click']['fused']['recall']:.4f}/"
                f"{res['metrics']['conversion']['fused']['recall']:.4f} ({res['seconds']:.0f}s)"
            )
        points = [p for p in points if p["setting"] != setting]
        points.append({"setting": setting, "seeds": seed_list, "metrics": metrics})
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, {"split": "val", "config": str(config), "points": points})
        (out / f"sensitivity-{dataset}.md").write_text(markdown(points))
    typer.echo(markdown(points))


if __name__ == "__main__":
    typer.run(main)
