"""Baselines and CSMF ablations for the comparison table (docs/design.md#baselines-and-evaluation).

Every method trains through the trainer's own code path — :func:`trainer.cascade.run_cascade`
or :func:`trainer.cascade.run_epochs` / :func:`trainer.cascade.batch_loss` (same features,
sampled softmax with log-Q, negatives, temperature, learning rate and per-objective epoch budget)
— and is scored by :func:`trainer.evaluate.evaluate_vectors` (the protocol of ``csmf eval``):

- ``csmf``, ``csmf-wo-cpp`` (cascade.pruning = "fixed"), ``csmf-wo-aml`` (loss.aml = false),
  ``csmf-wo-ar`` (cascade.accuracy_recovery = false): the cascade of the config;
- ``exposure-only``: a 1-stage cascade on exposures (the reference single model);
- ``sep`` (YouTubeDNN-Sep): one 1-stage model per objective (click, conversion), each scored on
  its own vectors; "merged" = k_click·s_click + k_conv·s_conv (eval.weights of those objectives);
- ``mix`` (YouTubeDNN-Mix): one model on click positives + conversion positives (a conversion
  is also a click, so it appears twice — the usual mixed-sample setup);
- ``mmoe`` (MMoE/MVKE-style): shared embeddings, K shared expert MLPs, one softmax gate per
  objective → one ``out_dim`` vector per objective; trained jointly, each objective on its own
  positives for its own epoch budget; fused = sum_t k_t <e_t, v_t> (3x storage and search);
- the paper's multi-objective baselines, one module each (paper, departures, serving layout in
  its docstring), all trained through :func:`trainer.baselines.joint.train_joint` or the same
  losses: ``mvke`` (:mod:`.mvke`), ``dmmp`` (:mod:`.dmmp`), ``dtml`` (:mod:`.dtml`),
  ``moppr`` (:mod:`.moppr`); DMMP and DTML distil from :mod:`.teacher`;
- ``popularity``: train-exposure / train-click counts;
- ``oracle`` (synthetic datasets only): items ranked by the generator's true expected clicks /
  conversions (``trainer.data.synthetic.true_scores``), the ceiling beside every other number;
- collaborative-filtering baselines (:mod:`trainer.cf_baselines`): ``als-click``,
  ``als-exposure``, ``bpr-click``, ``ease-click``, ``ease-exposure``, ``itemknn-click``,
  ``itemknn-exposure``, ``rp3beta-click``, ``rp3beta-exposure`` — hyper-parameters chosen on the validation split, (user, item) vectors
  scored by the same :func:`trainer.evaluate.evaluate_vectors`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import csmf.objectives as funnel
from csmf.checkpoint import new_model
from csmf.errors import DataError
from csmf.features import TowerSpec
from csmf.towers import Batch, ModelConfig, Tower
from trainer.baselines.dmmp import fused_queries, train_dmmp
from trainer.baselines.dtml import train_dtml
from trainer.baselines.joint import with_changes
from trainer.baselines.moppr import train_moppr
from trainer.baselines.mvke import train_mvke
from trainer.cascade import Log, batch_loss, run_cascade, run_epochs
from trainer.cf_baselines import CF_METHODS, run_cf
from trainer.config import RunConfig
from trainer.encoding import Encoded, StageExamples, stage_examples
from trainer.evaluate import Ranker, encode_all, evaluate_vectors, popularity_ranker
from trainer.ownership import mark_only_stage_trainable, unfreeze_all

CSMF_VARIANTS = {
    "csmf": {},
    "csmf-wo-cpp": {"cascade": {"pruning": "fixed"}},
    "csmf-wo-aml": {"loss": {"aml": False}},
    "csmf-wo-ar": {"cascade": {"accuracy_recovery": False}},
    # CPP against random pruning of the same budget (per layer, CPP's count, random units)
    "csmf-random-prune": {"cascade": {"pruning": "random"}},
    # the investigation's steps (bench/results/quality-investigation-ml-100k.md), each undoing
    # one change of the ML-100K default:
    # in-batch sampled softmax with log-Q instead of the exact catalogue softmax ...
    "csmf-in-batch": {"loss": {"negatives": "in-batch"}},
    # ... and the previous default: [256, 128] MLP towers with the in-batch softmax
    "csmf-mlp-in-batch": {"model": {"hidden": [256, 128]}, "loss": {"negatives": "in-batch"}},
}
METHODS = (
    *CSMF_VARIANTS,
    "exposure-only",
    "sep",
    "mix",
    "mmoe",
    "mvke",
    "dmmp",
    "dtml",
    "moppr",
    "popularity",
    *CF_METHODS,
    "oracle",
)


@dataclass
class MethodRun:
    """One method, one seed: the evaluation and the vectors a serving index would hold.

    ``serving`` lists (query, items, weight) per index to search; the result is the
    weight-scaled merge of the per-index top-N (one entry = one index, one search).
    """

    method: str
    result: dict  # evaluate_vectors output: {"users", "metrics"}
    seconds: float  # train (+ tuning) + evaluation
    serving: list[tuple[Tensor, Tensor, float]] = field(default_factory=list)
    vectors: str = "trained"  # or "random": same-shape stand-ins (flat-IP cost ignores values)
    train_seconds: float = 0.0  # fitting the final model (CF baselines: with chosen params)
    tune_seconds: float = 0.0  # validation grid search (CF baselines)
    tuning: dict | None = None  # chosen hyper-parameters and the validation grid (CF baselines)


# --------------------------------------------------------------------------- configs


def single_objective_config(cfg: RunConfig, objective: str) -> RunConfig:
    """A 1-stage cascade on ``objective`` with that stage's settings from ``cfg``: its budget
    (lr, epochs) and its training history (mode, dropout) — every per-stage value."""
    t = cfg.objectives.index(objective)
    mode, dropout = cfg.train.stage_history(t)
    return with_changes(
        cfg,
        {
            "cascade": {"objectives": [objective]},
            "eval": {"weights": [1.0]},
            "train": {
                "epochs": [cfg.train.stage_epochs(t)],
                "lr": [cfg.train.stage_lr(t)],
                "history": [mode],
                "history_dropout": [dropout],
            },
        },
    )


def _weights(cfg: RunConfig) -> dict[str, float]:
    return dict(zip(cfg.objectives, cfg.eval.weights, strict=True))


# --------------------------------------------------------------------------- single models


def train_single(cfg: RunConfig, enc: Encoded, objective: str, log: Log = print) -> torch.nn.Module:
    """A 1-stage cascade (run_cascade itself) on ``objective``."""
    cfg1 = single_objective_config(cfg, objective)
    torch.manual_seed(cfg.train.seed)
    model = new_model(cfg1.model, cfg1.features, enc.user_vocab, enc.item_vocab)
    run_cascade(model, enc, cfg1, log=log, progress=False)
    return model


def mixed_examples(enc: Encoded, objectives: tuple[str, ...]) -> StageExamples:
    """The concatenated positives of ``objectives``; item_prob over the mixture (for log-Q)."""
    parts = [stage_examples(enc, o) for o in objectives]
    item = np.concatenate([p.item for p in parts])
    counts = np.bincount(item, minlength=enc.n_items).astype(np.float64)
    return StageExamples(
        np.concatenate([p.user for p in parts]),
        item,
        np.concatenate([p.hist_end for p in parts]),
        np.concatenate([p.request for p in parts]),
        torch.as_tensor(counts / counts.sum(), dtype=torch.float32),
    )


def train_mix(
    cfg: RunConfig, enc: Encoded, objectives: tuple[str, ...] = funnel.TARGETS
) -> torch.nn.Module:
    """YouTubeDNN-Mix: one 1-stage model, run_epochs over the mixed positives (click budget)."""
    cfg1 = single_objective_config(cfg, objectives[0])
    torch.manual_seed(cfg.train.seed)
    model = new_model(cfg1.model, cfg1.features, enc.user_vocab, enc.item_vocab)
    rng = np.random.default_rng(cfg.train.seed)
    ex = mixed_examples(enc, objectives)
    params = mark_only_stage_trainable(model, 0)
    epochs = cfg1.train.stage_epochs(0)
    run_epochs(model, enc, ex, 0, objectives[0], params, cfg1, epochs, rng, "mix", False)
    unfreeze_all(model)
    return model


# --------------------------------------------------------------------------- multi-vector


class MultiVectorSide(nn.Module):
    """Shared embeddings (a :class:`csmf.towers.Tower`'s tables) → K expert MLPs → one gated
    mixture per objective. ``forward(batch, view)``: (B, D) of objective ``view``, or the
    concatenation [o_0 | o_1 | ...] (B, T·D) when ``view`` is None."""

    def __init__(
        self,
        spec: TowerSpec,
        sizes: Mapping[str, int],
        cfg: ModelConfig,
        n_objectives: int,
        n_experts: int,
        history_size: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding = Tower(spec, sizes, cfg, history_size=history_size)  # .embed only
        self.embedding.layers = nn.ModuleList()  # its MLP is replaced by the experts
        in_dim = sum(self.embedding.table(n).weight.shape[1] for n in self.embedding.inputs)
        in_dim += self.embedding.num_numeric
        act = {"relu": nn.ReLU, "silu": nn.SiLU}[cfg.activation]
        self.out_dim, self.n_objectives = cfg.out_dim, n_objectives
        self.experts = nn.ModuleList()
        for _ in range(n_experts):
            layers: list[nn.Module] = []
            width = in_dim
            for h in cfg.hidden:
                layers += [nn.Linear(width, h), act()]
                width = h
            layers.append(nn.Linear(width, cfg.out_dim))
            self.experts.append(nn.Sequential(*layers))
        self.gates = nn.ModuleList(nn.Linear(in_dim, n_experts) for _ in range(n_objectives))

    def forward(self, batch: Batch, view: int | None = None) -> Tensor:
        x = self.embedding.embed(batch)
        experts = torch.stack([f(x) for f in self.experts], dim=1)  # (B, K, D)
        views = range(self.n_objectives) if view is None else [view]
        outs = [
            (torch.softmax(self.gates[t](x), dim=1).unsqueeze(-1) * experts).sum(1) for t in views
        ]
        return outs[0] if view is not None else torch.cat(outs, dim=1)


class MultiVectorModel(nn.Module):
    """MMoE/MVKE-style two tower with one ``out_dim`` vector per objective on each side.

    Duck-types what :func:`trainer.cascade.batch_loss` and :func:`trainer.evaluate.encode_all`
    call: ``user(batch, view)`` and ``item(batch, view)``.
    """

    def __init__(
        self, cfg: ModelConfig, features, user_vocab, item_vocab, n_objectives: int, n_experts: int
    ) -> None:
        super().__init__()
        us, its = user_vocab.sizes(), item_vocab.sizes()
        self.user = MultiVectorSide(
            features.user, us, cfg, n_objectives, n_experts, history_size=its["id"]
        )
        self.item = MultiVectorSide(features.item, its, cfg, n_objectives, n_experts)
        self.out_dim, self.n_objectives = cfg.out_dim, n_objectives

    def view_scale(self, t: int) -> Tensor:
        """(T·D,) query scale selecting objective t's block."""
        scale = torch.zeros(self.n_objectives * self.out_dim)
        scale[t * self.out_dim : (t + 1) * self.out_dim] = 1.0
        return scale

    def fused_scale(self, weights) -> Tensor:
        """(T·D,) query scale: <e * scale, v> = sum_t k_t <e_t, v_t>."""
        w = torch.as_tensor([float(k) for k in weights], dtype=torch.float32)
        return torch.repeat_interleave(w, self.out_dim)

    def objective_scores(self, e: Tensor, v: Tensor) -> Tensor:
        """Per-objective scores for aligned (B, T·D) pairs → (B, T)."""
        b = e.shape[0]
        prod = (e * v).view(b, self.n_objectives, self.out_dim)
        return prod.sum(-1)


def train_multivector(
    cfg: RunConfig, enc: Encoded, n_experts: int = 3
) -> tuple[MultiVectorModel, list[float]]:
    """Joint training: each step sums batch_loss of every objective (its own positives, its own
    epoch budget, view t). No AML (there is no cascade). Returns the model and epoch losses."""
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    objectives = cfg.objectives
    model = MultiVectorModel(
        cfg.model, cfg.features, enc.user_vocab, enc.item_vocab, len(objectives), n_experts
    )
    cfg_loss = with_changes(cfg, {"loss": {"aml": False}})
    exs = [stage_examples(enc, o) for o in objectives]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.stage_lr(0))
    bs = cfg.train.batch_size
    model.train()
    losses = []
    for epoch in range(max(cfg.train.stage_epochs(t) for t in range(len(objectives)))):
        batches = []
        for t, ex in enumerate(exs):
            if epoch >= cfg.train.stage_epochs(t):
                batches.append([])
                continue
            perm = rng.permutation(len(ex))
            batches.append([perm[lo : lo + bs] for lo in range(0, len(perm), bs)])
        total, steps = 0.0, 0
        for step in range(max(len(b) for b in batches)):
            terms = [
                batch_loss(model, enc, exs[t], b[step], t, o, cfg_loss, rng)
                for t, (o, b) in enumerate(zip(objectives, batches, strict=True))
                if step < len(b) and len(b[step]) >= 2
            ]
            if not terms:
                continue
            loss = torch.stack(terms).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
    return model, losses


# --------------------------------------------------------------------------- one method


def run_method(
    method: str, cfg: RunConfig, enc: Encoded, log: Log = print, data: str | Path | None = None
) -> MethodRun:
    """Train (if needed) and evaluate ``method`` with ``cfg``'s seed on ``enc``'s test split.
    ``oracle`` reads ``truth.npz`` from the dataset folder ``data``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    start = time.perf_counter()
    n = cfg.eval.n
    k = _weights(cfg)
    rankers: dict[str, Ranker]
    serving: list[tuple[Tensor, Tensor, float]] = []
    if method in CF_METHODS:
        return _run_cf(method, cfg, enc, start)
    if method in CSMF_VARIANTS:
        from trainer.evaluate import fused_ranker, view_ranker

        c = with_changes(cfg, CSMF_VARIANTS[method])
        torch.manual_seed(c.train.seed)
        model = new_model(c.model, c.features, enc.user_vocab, enc.item_vocab)
        run_cascade(model, enc, c, log=log, progress=False)
        e, v = encode_all(model, enc)
        rankers = {o: view_ranker(model, t) for t, o in enumerate(c.objectives)}
        rankers["fused"] = fused_ranker(model, c.eval.weights)
        serving = [(e * rankers["fused"][1], v, 1.0)]
    elif method == "exposure-only":
        model = train_single(cfg, enc, "exposure", log=log)
        e, v = encode_all(model, enc)
        rankers = {"exposure": ("scale", torch.ones(e.shape[1]))}
        serving = [(e, v, 1.0)]
    elif method == "sep":
        es, vs = [], []
        for o in funnel.TARGETS:  # one model per labelled objective
            m = train_single(cfg, enc, o, log=log)
            e1, v1 = encode_all(m, enc)
            es.append(e1)
            vs.append(v1)
            serving.append((e1, v1, k[o]))
        d = es[0].shape[1]
        e, v = torch.cat(es, 1), torch.cat(vs, 1)
        one, zero = torch.ones(d), torch.zeros(d)
        rankers = {
            "click model": ("scale", torch.cat([one, zero])),
            "conversion model": ("scale", torch.cat([zero, one])),
            "merged": ("scale", torch.cat([one * k["click"], one * k["conversion"]])),
        }
    elif method == "mix":
        model = train_mix(cfg, enc)
        e, v = encode_all(model, enc)
        rankers = {"mix": ("scale", torch.ones(e.shape[1]))}
        serving = [(e, v, 1.0)]
    elif method == "mmoe":
        model, _ = train_multivector(cfg, enc)
        e, v = encode_all(model, enc)
        rankers = {o: ("scale", model.view_scale(t)) for t, o in enumerate(cfg.objectives)}
        rankers["fused"] = ("scale", model.fused_scale(cfg.eval.weights))
        serving = [(e * rankers["fused"][1], v, 1.0)]
    elif method == "mvke":
        model, _ = train_mvke(cfg, enc)
        e, v = encode_all(model, enc)
        tasks = model.tasks
        rankers = {o: ("scale", model.task_scale([o == x for x in tasks])) for o in tasks}
        rankers["fused"] = ("scale", model.task_scale([k[o] for o in tasks]))
        serving = [(e * rankers["fused"][1], v, 1.0)]
    elif method == "dmmp":
        model, _ = train_dmmp(cfg, enc)
        out, v = encode_all(model, enc)
        t, d = len(cfg.objectives), model.out_dim
        views = [out[:, s * d : (s + 1) * d] for s in range(t)]
        fused = fused_queries(out, cfg.eval.weights, t, d)
        e, v = torch.cat([*views, fused], 1), v.repeat(1, t + 1)
        rankers = {}
        for s, name in enumerate([*cfg.objectives, "fused"]):
            scale = torch.zeros(e.shape[1])
            scale[s * d : (s + 1) * d] = 1.0
            rankers[name] = ("scale", scale)
        serving = [(fused, v[:, :d], 1.0)]
    elif method in ("dtml", "moppr"):
        model, _ = (train_dtml if method == "dtml" else train_moppr)(cfg, enc)
        e, v = encode_all(model, enc)
        rankers = {method: ("scale", torch.ones(e.shape[1]))}
        serving = [(e, v, 1.0)]
    elif method == "oracle":
        e, v = torch.zeros(enc.n_users, 1), torch.zeros(enc.n_items, 1)
        rankers = oracle_rankers(enc, data)
    else:  # popularity
        e = torch.zeros(enc.n_users, 1)
        v = torch.zeros(enc.n_items, 1)
        rankers = {
            "exposures": popularity_ranker(enc),
            "clicks": popularity_ranker(enc, enc.events.clicked),
        }
    trained = time.perf_counter()
    result = evaluate_vectors(e, v, rankers, enc, n)
    return MethodRun(
        method, result, time.perf_counter() - start, serving, train_seconds=trained - start
    )


def _run_cf(method: str, cfg: RunConfig, enc: Encoded, start: float) -> MethodRun:
    """A CF baseline: tuned on validation, its vectors scored like CSMF's (one "scale" ranker)."""
    from trainer.cf_baselines import threadpool_limits

    with threadpool_limits(cfg.train.threads or None):  # EASE/ItemKNN's BLAS as torch's threads
        run = run_cf(method, enc, cfg.eval.n, cfg.model.out_dim, cfg.train.seed, cfg.train.threads)
    e, v = torch.from_numpy(run.e), torch.from_numpy(run.v)
    result = evaluate_vectors(
        e, v, {run.tuning["model"]: ("scale", torch.ones(e.shape[1]))}, enc, cfg.eval.n
    )
    return MethodRun(
        method,
        result,
        time.perf_counter() - start,
        [(e, v, 1.0)],
        train_seconds=run.train_seconds,
        tune_seconds=run.tune_seconds,
        tuning=run.tuning,
    )


def oracle_rankers(enc: Encoded, data: str | Path | None) -> dict[str, Ranker]:
    """Rank by the synthetic generator's true scores (user/item ids are its truth rows)."""
    from trainer.data.synthetic import load_truth, true_scores

    if data is None or not (Path(data) / "truth.npz").exists():
        raise DataError(f"the oracle needs a synthetic dataset's truth.npz; {data} has none")
    truth = load_truth(data)
    users = np.array([int(u) for u in enc.user_vocab.ids.values], dtype=np.int64)
    items = np.array([int(i) for i in enc.item_vocab.ids.values], dtype=np.int64)

    def ranker(objective: str) -> Ranker:
        return ("rows", lambda part: true_scores(truth, users[part], objective)[:, items])

    return {f"true {funnel.get(o).plural}": ranker(o) for o in funnel.TARGETS}
