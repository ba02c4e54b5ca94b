"""What the multi-objective baselines share: config edits, exposure pairs with their labels, and
the joint training loop (every objective's sampled softmax in one step, plus any extra terms).

Every joint model duck-types :func:`trainer.cascade.batch_loss`: ``model.user(batch, stage)`` and
``model.item(batch, stage)`` whose inner product is the stage's score, ``stage`` being the
objective's index in the config's cascade (so each objective keeps that stage's history mode,
dropout, epoch budget and — at the exposure stage — its request negatives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from trainer.cascade import batch_loss
from trainer.config import RunConfig
from trainer.encoding import Encoded, StageExamples, stage_examples


def with_changes(cfg: RunConfig, changes: Mapping[str, Mapping]) -> RunConfig:
    d = cfg.to_dict()
    for section, values in changes.items():
        d[section] = {**d[section], **values}
    return RunConfig.from_dict(d)


@dataclass
class Exposures:
    """The train split's exposures (every event) with their labels, for pointwise teachers and
    distillation: user/item rows, history end (events strictly earlier) and click/conversion."""

    user: np.ndarray
    item: np.ndarray
    hist_end: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def train_exposures(enc: Encoded) -> Exposures:
    ev = enc.events
    rows = enc.split.train
    user, item = ev.user[rows], ev.item[rows]
    hist_end = (
        enc.history.before(user, ev.ts[rows]) if enc.history is not None else np.zeros_like(user)
    )
    return Exposures(user, item, hist_end, ev.clicked[rows], ev.converted[rows])


def pair_batches(ex: Exposures, idx: np.ndarray, enc: Encoded) -> tuple[dict, dict]:
    """(user inputs with history before the event, item inputs) of exposures ``idx``."""
    return enc.user_batch(ex.user[idx], ex.hist_end[idx]), enc.item_batch(ex.item[idx])


class DynamicWeightAverage:
    """Dynamic weight average (Liu, Johns, Davison, CVPR 2019) of J losses: after each epoch,
    w_j = J·softmax_j(r_j / T) with r_j = L_j(epoch − 1) / L_j(epoch − 2) — a loss that stopped
    falling gets more weight; weights sum to J (the scale of plain summation), 1 for the first
    two epochs. Call with the step's losses (None = absent this step), :meth:`end_epoch` at each
    epoch boundary."""

    def __init__(self, n: int, temperature: float = 2.0) -> None:
        self.n, self.temperature = n, temperature
        self.weights = np.ones(n)
        self.history: list[np.ndarray] = []
        self._sum, self._count = np.zeros(n), np.zeros(n)

    def __call__(self, losses: Sequence[Tensor | None]) -> Tensor:
        total = None
        for j, loss in enumerate(losses):
            if loss is None:
                continue
            self._sum[j] += float(loss.detach())
            self._count[j] += 1
            term = self.weights[j] * loss
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no loss this step")
        return total

    def end_epoch(self) -> None:
        if not self._count.any():
            return
        self.history.append(self._sum / np.maximum(self._count, 1))
        self._sum, self._count = np.zeros(self.n), np.zeros(self.n)
        if len(self.history) >= 2:
            r = self.history[-1] / np.maximum(self.history[-2], 1e-12)
            z = np.exp((r - r.max()) / self.temperature)
            self.weights = self.n * z / z.sum()


def utility(p_ctr: Tensor, p_ctcvr: Tensor, k_click: float, k_conv: float) -> Tensor:
    """The teacher's fused value of a pair: (k_click·pCTR + k_conv·pCTCVR) / (k_click + k_conv)."""
    return (k_click * p_ctr + k_conv * p_ctcvr) / (k_click + k_conv)


@dataclass
class Distilled:
    """The train exposures as retrieval positives (the exposure stage's examples) with the
    teacher's value of each: positives are drawn ∝ value (:meth:`draw`), so the student's sampled
    softmax learns to retrieve exposures in proportion to what the teacher expects of them;
    ``examples.item_prob`` is the value-weighted item distribution (log-Q of the drawn items)."""

    examples: StageExamples
    value: np.ndarray  # (E,) teacher utility of each exposure, > 0

    def draw(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        p = self.value / self.value.sum()
        return rng.choice(len(self.value), size=batch, p=p)


@torch.no_grad()
def distilled_exposures(teacher, enc: Encoded, cfg: RunConfig) -> Distilled:
    """Score every train exposure with the teacher (its history before the event)."""
    ex = stage_examples(enc, cfg.objectives[0])
    k = dict(zip(cfg.objectives, cfg.eval.weights, strict=True))
    values = []
    for lo in range(0, len(ex), 8192):
        idx = np.arange(lo, min(lo + 8192, len(ex)))
        ub = enc.user_batch(ex.user[idx], ex.hist_end[idx])
        ctr, cvr = teacher.logits(ub, enc.item_batch(ex.item[idx]))
        p_ctr = torch.sigmoid(ctr)
        values.append(utility(p_ctr, p_ctr * torch.sigmoid(cvr), k["click"], k["conversion"]))
    value = torch.cat(values).double().clamp(min=1e-6).numpy()
    weighted = np.bincount(ex.item, weights=value, minlength=enc.n_items)
    prob = torch.as_tensor(weighted / weighted.sum(), dtype=torch.float32)
    examples = StageExamples(ex.user, ex.item, ex.hist_end, ex.request, prob)
    return Distilled(examples, value)


Extra = Callable[[int, np.random.Generator], list[Tensor]]  # (step, rng) → extra loss terms


def train_joint(
    model: nn.Module,
    cfg: RunConfig,
    enc: Encoded,
    objectives: Sequence[str],
    extra: Extra | None = None,
    combine: Callable[[list[Tensor], list[Tensor]], Tensor] | None = None,
    params: list[nn.Parameter] | None = None,
    min_steps: int = 0,
) -> list[float]:
    """Each step: batch_loss of every objective in ``objectives`` (its own positives, its own
    epoch budget, its cascade stage's settings) and ``extra(step, rng)``'s terms, summed (or
    ``combine(objective_terms, extra_terms)``). An epoch has at least ``min_steps`` steps (a
    distillation term over every exposure needs more steps than the clicks fill; the objectives
    whose batches are used up sit those steps out). No AML (there is no cascade). Returns the
    mean loss per epoch."""
    rng = np.random.default_rng(cfg.train.seed)
    stages = [cfg.objectives.index(o) for o in objectives]
    cfg_loss = with_changes(cfg, {"loss": {"aml": False}})
    exs = [stage_examples(enc, o) for o in objectives]
    opt = torch.optim.Adam(params or list(model.parameters()), lr=cfg.train.stage_lr(0))
    bs = cfg.train.batch_size
    model.train()
    losses = []
    for epoch in range(max(cfg.train.stage_epochs(s) for s in stages)):
        batches = []
        for s, ex in zip(stages, exs, strict=True):
            if epoch >= cfg.train.stage_epochs(s):
                batches.append([])
                continue
            perm = rng.permutation(len(ex))
            batches.append([perm[lo : lo + bs] for lo in range(0, len(perm), bs)])
        total, steps = 0.0, 0
        for step in range(max(min_steps, *(len(b) for b in batches))):
            terms = [
                batch_loss(model, enc, exs[k], b[step], s, o, cfg_loss, rng)
                for k, (s, o, b) in enumerate(zip(stages, objectives, batches, strict=True))
                if step < len(b) and len(b[step]) >= 2
            ]
            more = extra(step, rng) if extra is not None else []
            if not terms and not more:
                continue
            loss = combine(terms, more) if combine is not None else torch.stack(terms + more).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
    model.eval()
    return losses
