"""Add an objective to a trained cascade (docs/design.md#adding-an-objective).

``csmf extend RUN --objective NAME --label COLUMN --data DATA --out NEW`` appends stage T (T =
the cascade's length) for objective NAME, whose positives are the events where the bool column
COLUMN is true:

1. Units: the ones the last stage left unowned (``cascade.last_tau`` > 0: CPP freed them after
   the last objective trained, AR recovered it, and they were zeroed). A run trained without
   them has none to give and is refused — every owned unit belongs to an objective whose scores
   must not move.
2. Stage T re-initialises those units (zeroed, they would get no gradient) and trains them with the cascade's loss: the sampled (or catalogue) softmax of view
   T with the AML margin from the upstream objectives, on DATA's train-split positives of NAME.
   A connection from a unit owned by t into one owned by t' exists only if t <= t', so the new
   units read every earlier unit and no earlier unit reads them.
3. Proof, before anything is written: every entry owned by objectives 0..T-1 is bit-identical
   (:class:`~trainer.ownership.FrozenSnapshot`) and so are their scores s_0..s_{T-1} on a fixed
   probe of users and items (``torch.equal``). A bundle built from the new run serves every old
   weighting (the new objective's weight 0) with bit-identical scores: the new dims were exactly
   0 in every vector before, and a weight of 0 scales them to 0 now.

The new objective's name and label column go into the run's config (``cascade.labels``), so the
index builder, ``csmf eval`` and the service know it from the checkpoint. The run is only read.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from csmf.checkpoint import (
    Checkpoint,
    load_checkpoint,
    new_model,
)
from csmf.errors import ConfigError, OwnershipError
from trainer.cascade import Log, _val, output_slices, probe_scores, run_epochs
from trainer.config import RunConfig, config_from_dict
from trainer.data.dataset import load_dataset, split_by_time
from trainer.encoding import encode_dataset, stage_examples
from trainer.ownership import FrozenSnapshot, mark_only_stage_trainable, unfreeze_all
from trainer.pipeline import RunFolderError, check_run_folder, run_checkpoint, write_run
from trainer.pruning import reinit_units


def extended_config(
    ckpt: Checkpoint, objective: str, label: str, weight: float, overrides: list[str]
) -> RunConfig:
    """The run's config with ``objective`` appended: its label in ``cascade.labels``, its
    ``eval.weights`` entry, and one more value in every per-stage list (the last one repeated)."""
    raw = dict(ckpt.train_config)
    cascade = dict(raw.get("cascade", {}))
    objectives = list(cascade.get("objectives", ckpt.objectives))
    if objective in objectives:
        raise ConfigError(f"objective {objective!r} is already in the cascade {objectives}")
    t = len(objectives)
    cascade["objectives"] = [*objectives, objective]
    cascade["labels"] = {**cascade.get("labels", {}), objective: label}
    raw["cascade"] = cascade
    train = dict(raw.get("train", {}))
    for key in ("lr", "epochs", "history", "history_dropout"):
        values = train.get(key)
        if isinstance(values, list | tuple) and len(values) == t:
            train[key] = [*values, values[-1]]
    raw["train"] = train
    warm = dict(raw.get("warm", {}))
    for key in ("epochs", "lr"):
        values = warm.get(key)
        if isinstance(values, list | tuple) and len(values) == t:
            warm[key] = [*values, values[-1]]
    raw["warm"] = warm
    raw["eval"] = {**raw.get("eval", {}), "weights": [*raw["eval"]["weights"], weight]}
    return config_from_dict(raw, overrides)


def extend_run(
    run: str | Path,
    objective: str,
    label: str,
    data: str | Path,
    out: str | Path,
    *,
    weight: float = 1.0,
    overrides: list[str] | None = None,
    log: Log = print,
    progress: bool = True,
    force: bool = False,
    probe_size: int = 1000,
) -> tuple[Path, dict]:
    """Train objective ``objective`` (label column ``label``) on the units run ``run`` left
    unowned, into the new run folder ``out``; returns (checkpoint path, metrics)."""
    run, data, out = Path(run), Path(data), Path(out)
    if out.resolve() == run.resolve():
        raise RunFolderError(f"--out {out} is the run being extended; it stays intact")
    ckpt = load_checkpoint(run)
    t = len(ckpt.objectives)
    cfg = extended_config(ckpt, objective, label, weight, list(overrides or []))
    old = ckpt.build_model()
    free = old.unowned_units()
    out_free = int((old.output_owner == t).sum())
    if out_free == 0:
        raise ConfigError(
            f"{run} has no unowned output dims for a new objective ({free} unowned units in "
            "all): every unit belongs to an objective whose scores must not change. Train the "
            "cascade with cascade.last_tau > 0 (e.g. 0.1) to leave some for objectives added later"
        )
    check_run_folder(out, force)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    start = time.perf_counter()
    ds = load_dataset(data, cfg.features, objectives=cfg.objectives)
    split = split_by_time(ds.events, **asdict(cfg.split))
    enc = encode_dataset(ds, cfg.features, split, (ckpt.user_vocab, ckpt.item_vocab))
    ex = stage_examples(enc, objective)
    model = new_model(cfg.model, cfg.features, ckpt.user_vocab, ckpt.item_vocab)
    model.load_state_dict(old.state_dict())
    model.sync_owners()
    model.check_owners()
    model.use_sparse_gradients(cfg.train.id_tables == "row-wise")
    rng = np.random.default_rng(cfg.train.seed)
    n = min(probe_size, enc.n_users)
    probe = (rng.integers(0, enc.n_users, n), rng.integers(0, enc.n_items, n))
    model.eval()
    before = probe_scores(model, enc, probe)[:, :t].clone()
    snapshot = FrozenSnapshot.take(model, t)
    # Zeroed units on both towers are a saddle (each side's gradient is the other's zero) and a
    # zero ReLU input passes no gradient: start them as a fresh model would. No earlier unit reads
    # them, so this moves nothing the snapshot holds.
    reinit_units(model, t, torch.Generator().manual_seed(cfg.train.seed + 1))
    params = mark_only_stage_trainable(model, t)
    name = f"stage {t} ({objective})"
    log(
        f"{name}: {len(ex):,} train positives on {free} unowned units ({out_free} output dims), "
        f"{cfg.train.stage_epochs(t)} epochs"
    )
    rec: dict = {"objective": objective, "positives": len(ex), "trainable": params.count()}
    t_train = time.perf_counter()
    rec["loss"] = run_epochs(
        model, enc, ex, t, objective, params, cfg, cfg.train.stage_epochs(t), rng, name,
        progress, log=log,
    )  # fmt: skip
    rec["train_seconds"] = time.perf_counter() - t_train
    unfreeze_all(model)
    model.eval()
    snapshot.verify(model)  # every entry of objectives 0..t-1, bit for bit
    after = probe_scores(model, enc, probe)[:, :t]
    if not torch.equal(after, before):
        raise OwnershipError(f"adding {objective!r} changed the scores of earlier objectives")
    rec["val_recall"] = {"trained": _val(model, enc, t, objective, cfg)}
    rec["seconds"] = time.perf_counter() - start
    rec["unowned_units"] = free
    log(f"{name}: loss {rec['loss'][-1]:.4f}, val Recall@{cfg.eval.n} "
        f"{rec['val_recall']['trained']:.4f}, {rec['seconds']:.1f}s; earlier objectives' "
        f"scores bit-identical on {n} probe pairs")  # fmt: skip
    metrics = dict(ckpt.metrics)
    metrics["stages"] = [*metrics.get("stages", []), rec]
    metrics["output_slices"] = output_slices(model)
    metrics["extended_from"] = {"run": str(run.resolve()), "objective": objective, "label": label}
    new = run_checkpoint(cfg, data, model, ckpt.user_vocab, ckpt.item_vocab, metrics)
    return write_run(out, new), metrics
