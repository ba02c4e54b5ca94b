"""The quality gate of ``csmf daily``: the candidate against the serving model on the same holdout,
scored by the same code (trainer.evaluate), refused below a relative margin.

The holdout is the test split of the new data under the candidate's split config. In a daily
update that is the global time split: every event of the latest period (``split.test_from``),
which neither model trained on — the serving model trained through an earlier time, and the
candidate trains on the events before the period. Both models rank the same catalogue (the items
of the new data) for the same users, excluding each user's train items, and are scored on the
same positives.

The serving model has never seen users and items that appeared since it was trained. It is
evaluated the way the service would treat them: its id tables are re-indexed to the candidate's
id vocabularies, an id it does not know taking its UNK row (the cold-start vector). Its own field
vocabularies and numeric statistics encode the features, as at serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from csmf.checkpoint import Checkpoint, new_model
from csmf.errors import ConfigError, CsmfError
from csmf.features import UNK, TowerVocab
from csmf.towers import TwoTower
from trainer.config import RunConfig
from trainer.data.dataset import load_dataset, split_by_time
from trainer.encoding import encode_dataset
from trainer.evaluate import evaluate_model

METRICS = ("recall", "ndcg")


class GateError(CsmfError, ValueError):
    """The two models cannot be compared (no holdout positives, no shared target)."""


@dataclass(frozen=True)
class GateConfig:
    margin: float = field(
        default=0.01,
        metadata={
            "help": "refuse to publish when the candidate's score on any target is below "
            "(1 - margin) x the serving model's (relative; 0.01 = 1 %)"
        },
    )
    metric: str = field(
        default="recall",
        metadata={"help": "gate metric @N of the fused score", "choices": METRICS},
    )
    n: int | None = field(
        default=None, metadata={"help": "cut-off N of the gate metric [default: the run's eval.n]"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1), got {self.margin}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")


@dataclass
class GateReport:
    """What the gate measured and decided; ``candidate``/``serving``: {target: {metric: value}}
    of the fused score (``serving`` None on the first day)."""

    passed: bool
    reason: str
    metric: str
    n: int
    margin: float
    users: dict[str, int]
    candidate: dict[str, dict[str, float]]
    serving: dict[str, dict[str, float]] | None

    def to_dict(self) -> dict:
        return asdict(self)


def run_gate(
    candidate: Checkpoint, serving: Checkpoint | None, data: str | Path, cfg: GateConfig
) -> GateReport:
    """Score the candidate (and the serving model) on the holdout of ``data``; decide."""
    run_cfg = RunConfig.from_dict(candidate.train_config)
    n = cfg.n or run_cfg.eval.n
    weights = run_cfg.eval.weights
    ds = load_dataset(data, candidate.features, objectives=candidate.objectives)
    split = split_by_time(ds.events, **asdict(run_cfg.split))
    targets = _targets(candidate, serving)
    enc = encode_dataset(
        ds, candidate.features, split, (candidate.user_vocab, candidate.item_vocab)
    )
    cand = evaluate_model(
        candidate.build_model(), enc, candidate.objectives, weights, n, targets=targets
    )
    users = cand["users"]
    if not any(users.values()):
        raise GateError(
            f"the holdout of {data} has no {' or '.join(targets)} positives: nothing to compare "
            f"the models on (split test_frac={run_cfg.split.test_frac}, "
            f"min_events={run_cfg.split.min_events})"
        )
    cand_scores = _fused(cand)
    if serving is None:
        return GateReport(
            True, "no serving model yet: the first model is published without comparison",
            cfg.metric, n, cfg.margin, users, cand_scores, None,
        )  # fmt: skip
    model, user_vocab, item_vocab = reindexed(serving, candidate.user_vocab, candidate.item_vocab)
    enc_s = encode_dataset(ds, serving.features, split, (user_vocab, item_vocab))
    serv = evaluate_model(model, enc_s, serving.objectives, weights, n, targets=targets)
    serv_scores = _fused(serv)
    worse = [
        f"{t} {cfg.metric}@{n} {cand_scores[t][cfg.metric]:.4f} < (1 - {cfg.margin:g}) x "
        f"serving {serv_scores[t][cfg.metric]:.4f}"
        for t in targets
        if users[t] and cand_scores[t][cfg.metric] < (1 - cfg.margin) * serv_scores[t][cfg.metric]
    ]
    if worse:
        reason = "candidate is worse than the serving model: " + "; ".join(worse)
    else:
        reason = "candidate within the margin of the serving model or better: " + ", ".join(
            f"{t} {cfg.metric}@{n} {cand_scores[t][cfg.metric]:.4f} vs "
            f"{serv_scores[t][cfg.metric]:.4f}"
            for t in targets
        )
    return GateReport(not worse, reason, cfg.metric, n, cfg.margin, users, cand_scores, serv_scores)


def _targets(candidate: Checkpoint, serving: Checkpoint | None) -> tuple[str, ...]:
    """The labelled objectives both models score (click, conversion, ...), cascade order."""
    from csmf.objectives import TARGETS

    mine = [t for t in TARGETS if t in candidate.objectives]
    if serving is not None:
        mine = [t for t in mine if t in serving.objectives]
    if not mine:
        raise GateError(
            f"the candidate {list(candidate.objectives)} and the serving model "
            f"{list(serving.objectives) if serving else []} share no labelled objective to gate on"
        )
    return tuple(mine)


def _fused(result: dict) -> dict[str, dict[str, float]]:
    return {t: dict(rankers["fused"]) for t, rankers in result["metrics"].items()}


def reindexed(
    ckpt: Checkpoint, user_ids: TowerVocab, item_ids: TowerVocab
) -> tuple[TwoTower, TowerVocab, TowerVocab]:
    """``ckpt``'s model with its id tables (user ids, item ids, the history table over item ids)
    re-indexed to the id vocabularies of ``user_ids``/``item_ids``: rows of ids it knows are its
    own, unknown ids get its UNK row. Returns the model and the vocabularies to encode its inputs
    with (the new ids, its own field vocabularies and numeric statistics)."""
    user_vocab = TowerVocab(
        user_ids.ids,
        ckpt.user_vocab.categorical,
        ckpt.user_vocab.multi_hot,
        ckpt.user_vocab.numeric,
    )
    item_vocab = TowerVocab(
        item_ids.ids,
        ckpt.item_vocab.categorical,
        ckpt.item_vocab.multi_hot,
        ckpt.item_vocab.numeric,
    )
    old = ckpt.build_model()
    model = new_model(ckpt.model_config, ckpt.features, user_vocab, item_vocab)
    state = dict(old.state_dict())
    user_rows = _row_map(ckpt.user_vocab, user_ids)
    item_rows = _row_map(ckpt.item_vocab, item_ids)
    state["user.tables.id.weight"] = state["user.tables.id.weight"][user_rows]
    state["item.tables.id.weight"] = state["item.tables.id.weight"][item_rows]
    if "user.tables.history.weight" in state:
        state["user.tables.history.weight"] = state["user.tables.history.weight"][item_rows]
    model.load_state_dict(state)
    model.sync_owners()
    model.check_owners()
    return model.eval(), user_vocab, item_vocab


def _row_map(old: TowerVocab, new: TowerVocab) -> torch.Tensor:
    """(len(new.ids),) rows of ``old``'s table for each row of ``new``'s: PAD → 0, UNK → 1, a
    known id → its old row, an unknown one → UNK."""
    idx = old.ids.encode_arrow(new.ids.arrow_values())  # (n,) old index, UNK if unknown
    return torch.as_tensor(np.concatenate([[0, UNK], idx]), dtype=torch.long)


def format_report(r: GateReport, targets: Sequence[str] | None = None) -> str:
    """A few lines for the log: per target, candidate vs serving."""
    lines = [f"gate ({r.metric}@{r.n} of the fused score, margin {r.margin:g}):"]
    for t in targets or list(r.candidate):
        serving = "" if r.serving is None else f"  serving {r.serving[t][r.metric]:.4f}"
        lines.append(
            f"  {t:<12} candidate {r.candidate[t][r.metric]:.4f}{serving}  ({r.users[t]} users)"
        )
    return "\n".join(lines)
