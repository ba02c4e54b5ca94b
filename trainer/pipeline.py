"""Run-level glue shared by the CLI and the report: dataset → encoded tensors → cascade →
checkpoint, and checkpoint → evaluation table.

A run folder holds ``checkpoint.pt`` (csmf.checkpoint format; ``dataset`` = absolute path of the
dataset folder), ``train_metrics.json`` and, after ``csmf eval``, ``eval.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from csmf.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    load_checkpoint,
    new_model,
    save_checkpoint,
    training_provenance,
)
from csmf.weights import parse_weights
from trainer.cascade import Log, run_cascade
from trainer.config import RunConfig
from trainer.data.dataset import load_dataset, split_by_time
from trainer.encoding import Encoded, encode_dataset
from trainer.evaluate import evaluate_model

TRAIN_METRICS = "train_metrics.json"
EVAL_NAME = "eval.json"


def prepare(cfg: RunConfig, data: str | Path, vocabs=None) -> Encoded:
    """Load, validate, split and encode a dataset folder for ``cfg`` (and apply its threads)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ds = load_dataset(data, cfg.features, objectives=cfg.objectives)
    split = split_by_time(ds.events, **asdict(cfg.split))
    return encode_dataset(ds, cfg.features, split, vocabs)


def train_run(
    cfg: RunConfig, data: str | Path, out: str | Path, log: Log = print, progress: bool = True
) -> tuple[Path, dict]:
    """Train the cascade on ``data`` and write the run folder ``out``; returns (checkpoint, metrics)."""
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    enc = prepare(cfg, data)
    log(
        f"data {data}: {enc.n_users:,} users, {enc.n_items:,} items, "
        f"{len(enc.split.train):,}/{len(enc.split.val):,}/{len(enc.split.test):,} "
        "train/val/test events"
    )
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    metrics = run_cascade(model, enc, cfg, log=log, progress=progress)
    metrics["seconds"] = time.perf_counter() - start
    ckpt = Checkpoint(
        model_config=cfg.model,
        features=cfg.features,
        user_vocab=enc.user_vocab,
        item_vocab=enc.item_vocab,
        objectives=cfg.objectives,
        state_dict=model.state_dict(),
        dataset=str(Path(data).resolve()),
        train_config=cfg.to_dict(),
        metrics=metrics,
        provenance=training_provenance(data, enc.user_vocab, enc.item_vocab),
    )
    out = Path(out)
    path = save_checkpoint(ckpt, out / CHECKPOINT_NAME)
    write_json(out / TRAIN_METRICS, {"config": cfg.to_dict(), **metrics})
    return path, metrics


def eval_run(
    run: str | Path, weights: str | None = None, n: int | None = None, write: bool = True
) -> dict:
    """Evaluate a run folder on its dataset's test split; writes ``eval.json`` into the run."""
    ckpt = load_checkpoint(run)
    cfg = RunConfig.from_dict(ckpt.train_config)
    k = parse_weights(_floats(weights), ckpt.objectives) if weights else cfg.eval.weights
    n = n or cfg.eval.n
    enc = prepare(cfg, ckpt.dataset, vocabs=(ckpt.user_vocab, ckpt.item_vocab))
    result = evaluate_model(ckpt.build_model(), enc, ckpt.objectives, k, n)
    result.update(run=str(Path(run)), dataset=ckpt.dataset, objectives=list(ckpt.objectives))
    result["seed"] = cfg.train.seed
    if write:
        write_json(Path(run) / EVAL_NAME, result)
    return result


def _floats(text: str) -> list[float]:
    from csmf.errors import WeightsError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise WeightsError(
            f"--weights expects comma-separated numbers like 1,1.8,1.2, got {text!r}"
        ) from None


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def format_table(result: dict) -> str:
    """Rows = rankers, columns = Recall@N / nDCG@N on each target."""
    n = result["n"]
    targets = list(result["metrics"])
    head = ["ranker"] + [f"{t} {m}@{n}" for t in targets for m in ("recall", "ndcg")]
    names = list(next(iter(result["metrics"].values())))
    lines = [" | ".join(f"{h:>18}" if i else f"{h:<24}" for i, h in enumerate(head))]
    for name in names:
        cells = [
            f"{result['metrics'][t][name][m]:>18.4f}" for t in targets for m in ("recall", "ndcg")
        ]
        lines.append(" | ".join([f"{name:<24}", *cells]))
    users = ", ".join(f"{t}: {u}" for t, u in result["users"].items())
    lines.append(f"(test users with positives — {users}; weights {result['weights']})")
    return "\n".join(lines)
