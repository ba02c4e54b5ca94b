"""Warm start: continue a trained cascade on new events (docs/design.md#warm-start).

``csmf train --from RUN --data DATA --out NEW`` — the daily update:

1. The previous run's configuration, with ``--set`` changes; a ``--config`` must describe the
   same features and towers (another feature spec cannot continue these tables).
2. Vocabularies grow: ids and categories first seen in DATA's users and items tables are
   appended, every existing one keeps its index (:meth:`csmf.features.Vocab.extended`). Entities
   the new tables no longer list (a withdrawn item) keep their rows, with unknown features.
3. The model's tables grow to match: existing rows keep their values bit for bit, new rows are
   drawn as at initialisation (seeded by ``train.seed``).
4. Each stage t, in cascade order, fine-tunes only the units objective t owns, for
   ``warm.epochs`` epochs, on the train-split positives newer than what the previous run
   trained on (its ``trained_through`` time; DATA may hold older events too — they shape the
   users' histories and the split but are not trained on again). No CPP and no AR: ownership
   does not change, so every earlier bundle's slice layout stays. After each stage every entry
   owned by another stage is verified bit-identical.
5. Each stage's optimizer starts fresh or, with ``warm.moments = "carry"``, from the previous
   run's final moments (trainer/moments.py); the new run keeps its own for the next day.

The previous run is only read: a crash leaves it, and the bundle built from it, intact.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from csmf.checkpoint import Checkpoint, new_model
from csmf.errors import ConfigError
from csmf.features import TowerSpec, TowerVocab
from csmf.towers import OwnedEmbedding, TwoTower
from trainer.cascade import Log, _val, run_epochs
from trainer.config import RunConfig
from trainer.data.dataset import Dataset
from trainer.encoding import OFFSET, Encoded, stage_examples, tower_columns
from trainer.moments import Moments, capture, restore
from trainer.ownership import (
    FrozenSnapshot,
    StageParams,
    mark_only_stage_trainable,
    owned_parameters,
    unfreeze_all,
)

__all__ = ["grow_model", "grow_vocabs", "run_warm", "warm_config"]

ITEM_ID_TABLE = "item.tables.id.weight"  # the catalogue's id rows (owned_parameters' name)
USER_ID_TABLE = "user.tables.id.weight"


def warm_config(ckpt: Checkpoint, given: RunConfig | None = None) -> RunConfig:
    """The configuration a warm start of ``ckpt`` trains with: ``given`` (a --config with its
    --set changes) if it describes the same features, towers and cascade, else the run's own."""
    own = RunConfig.from_dict(ckpt.train_config)
    if given is None:
        return own
    for what, a, b in (
        ("features", given.features, own.features),
        ("model", given.model, own.model),
        ("cascade.objectives", given.objectives, own.objectives),
    ):
        if a != b:
            raise ConfigError(
                f"--config describes other {what} than the --from run; a warm start continues "
                "the run's own tables and towers (train from scratch for a new feature spec)"
            )
    return given


def grow_vocabs(
    ckpt: Checkpoint, ds: Dataset, spec_user: TowerSpec, spec_item: TowerSpec
) -> tuple[TowerVocab, TowerVocab, dict[str, int]]:
    """The run's vocabularies grown by ``ds``'s tables, and how many rows each table gained."""
    uv = ckpt.user_vocab.extended(spec_user, tower_columns(ds.users, spec_user))
    iv = ckpt.item_vocab.extended(spec_item, tower_columns(ds.items, spec_item))
    old = {
        **_prefixed("user", ckpt.user_vocab.sizes()),
        **_prefixed("item", ckpt.item_vocab.sizes()),
    }
    new = {**_prefixed("user", uv.sizes()), **_prefixed("item", iv.sizes())}
    return uv, iv, {k: new[k] - old[k] for k in new}


def _prefixed(side: str, sizes: dict[str, int]) -> dict[str, int]:
    return {f"{side}.{k}": v for k, v in sizes.items()}


def grow_model(ckpt: Checkpoint, user_vocab: TowerVocab, item_vocab: TowerVocab) -> TwoTower:
    """The checkpoint's model with tables sized for the grown vocabularies: every existing entry
    copied bit for bit, new rows as a fresh model initialises them (call under a seeded RNG)."""
    model = new_model(ckpt.model_config, ckpt.features, user_vocab, item_vocab)
    state = model.state_dict()
    for name, old in ckpt.state_dict.items():
        if name not in state:
            raise ConfigError(f"the --from checkpoint has a parameter {name!r} this model lacks")
        new = state[name]
        if new.shape == old.shape:
            state[name] = old.clone()
        elif new.dim() == 2 and new.shape[1] == old.shape[1] and new.shape[0] >= old.shape[0]:
            new[: old.shape[0]] = old  # an id or category table that grew
        else:
            raise ConfigError(
                f"cannot grow {name} from {tuple(old.shape)} to {tuple(new.shape)} (only table "
                "rows can grow)"
            )
    model.load_state_dict(state)
    model.sync_owners()
    model.check_owners()
    return model


def new_positives(enc: Encoded, cfg: RunConfig, since: int | None) -> dict[str, int]:
    """Per objective, the train-split positives a warm start would fine-tune on."""
    return {o: len(stage_examples(enc, o, since=since)) for o in cfg.objectives}


def restrict(
    params: StageParams,
    model: TwoTower,
    scope: str,
    old_rows: dict[str, int],
    named: Tensor | None = None,
) -> StageParams:
    """``params`` narrowed to ``warm.train``'s scope: 'owned' as they are; 'tables' only the
    embedding tables (the rows a batch looks up move, the layers stay); 'touched' the tables too,
    but an item's id row moves only if ``named`` ((n_items,) bool by item index: the items the
    stage's new positives name) — the catalogue softmax looks up every item as a negative, and
    under 'tables' that drags the whole catalogue towards the new period's users; 'ids' only id
    rows (the batch users', the named items') and rows grown since: the rows every user shares
    (categories, history items) stay; 'new-rows' only the table rows this update grew
    (``old_rows``: parameter name → rows before growing; a table it does not name grew none)."""
    if scope == "owned":
        return params
    if scope == "new-rows" and not old_rows:
        raise ConfigError("warm.train = 'new-rows' needs the tables' row counts before growing")
    if scope in ("touched", "ids") and named is None:
        raise ConfigError(f"warm.train = {scope!r} needs the items the new positives name")
    tables = {
        id(p): name
        for name, module, _, p in owned_parameters(model)
        if isinstance(module, OwnedEmbedding)
    }
    keep: list[int] = []
    rows: list[Tensor | None] = []
    for i, p in enumerate(params.params):
        name = tables.get(id(p))
        if name is None:  # a layer
            p.requires_grad_(False)
            continue
        sel = None
        if scope in ("touched", "ids") and name == ITEM_ID_TABLE:  # item i is row OFFSET + i
            sel = torch.zeros(p.shape[0], dtype=torch.bool)
            sel[OFFSET + torch.nonzero(named.cpu()).squeeze(1)] = True
        elif scope == "new-rows" or (scope == "ids" and name != USER_ID_TABLE):
            # rows grown since (a table missing from old_rows grew none)
            sel = torch.arange(p.shape[0]) >= old_rows.get(name, p.shape[0])
        if sel is not None and not bool(sel.any()):
            p.requires_grad_(False)
            continue
        keep.append(i)
        rows.append(None if sel is None else sel.to(p.device))
    return StageParams(
        params.stage,
        [params.params[i] for i in keep],
        [params.masks[i] for i in keep],
        [params.row_sparse[i] for i in keep],
        rows=rows,
    )


def run_warm(
    model: TwoTower,
    enc: Encoded,
    cfg: RunConfig,
    since: int | None,
    log: Log = print,
    progress: bool = True,
    old_rows: dict[str, int] | None = None,
    carried: Moments | None = None,
) -> dict:
    """Fine-tune each stage's own units on the positives after ``since`` (all of them if None);
    returns per-stage metrics and, under "moments", each stage's final optimizer moments.
    Raises OwnershipError if a stage moved another stage's entry. ``old_rows`` (table parameter
    name → rows before growing) scopes ``warm.train``; ``carried``: the previous run's moments,
    each stage's optimizer starts from (trainer/moments.py; None = fresh optimizers)."""
    rng = np.random.default_rng(cfg.train.seed)
    stages = []
    kept: Moments = {}
    for t, objective in enumerate(cfg.objectives):
        before = (carried or {}).get(str(t), {})
        if before:  # passed on as they are unless this stage trains them further
            kept[str(t)] = before
        start = time.perf_counter()
        ex = stage_examples(enc, objective, since, cfg.warm.replay, rng)
        name = f"warm stage {t} ({objective})"
        epochs = cfg.warm.stage_epochs(t)
        new = len(stage_examples(enc, objective, since)) if cfg.warm.replay else len(ex)
        rec: dict = {"objective": objective, "positives": len(ex), "new": new, "epochs": epochs}
        if len(ex) < 2 or epochs == 0:
            log(f"{name}: {len(ex)} new positives, {epochs} epochs — nothing to fine-tune")
            rec.update(loss=[], seconds=time.perf_counter() - start)
            stages.append(rec)
            continue
        snapshot = FrozenSnapshot.take(model, t, others=True)
        params = restrict(
            mark_only_stage_trainable(model, t), model, cfg.warm.train, old_rows or {},
            named=ex.item_prob > 0,
        )  # fmt: skip
        rec["trainable"] = params.count()
        lr = cfg.warm.stage_lr(t, cfg.train)
        opt = params.optimizer(lr)  # at warm.lr: run_epochs steps this one
        rec["moments_carried"] = restore(model, t, opt, before) if carried is not None else []
        log(
            f"{name}: {len(ex):,} new positives, {epochs} epochs at lr {lr:g}, "
            + (f"moments of {len(rec['moments_carried'])} parameters carried"
               if carried is not None else "fresh optimizer")
        )  # fmt: skip
        rec["loss"] = run_epochs(
            model, enc, ex, t, objective, params, cfg, epochs, rng, name, progress, log=log,
            optimizer=opt,
        )  # fmt: skip
        kept[str(t)] = {**before, **capture(model, t, opt)}
        unfreeze_all(model)
        snapshot.verify(model)  # only objective t's units moved
        rec["val_recall"] = _val(model, enc, t, objective, cfg)
        rec["seconds"] = time.perf_counter() - start
        log(
            f"{name}: loss {rec['loss'][-1]:.4f}, val Recall@{cfg.eval.n} "
            f"{rec['val_recall']:.4f}, {rec['seconds']:.1f}s"
        )
        stages.append(rec)
    return {"stages": stages, "moments": kept}


def trained_through(enc: Encoded, since: int | None = None) -> int | None:
    """The newest train-split event time (what the next warm start continues after)."""
    ts = enc.train_times()
    if ts is None:
        return None
    newest = int(ts.max()) if len(ts) else None
    if since is None:
        return newest
    return since if newest is None else max(newest, since)
