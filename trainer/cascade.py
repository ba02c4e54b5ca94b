"""The CSMF cascade (DESIGN §2): for each objective t in order,

    train (units owned by t) → CPP (free units for t + 1) → AR (kept units, fraction rho) → freeze

with the last stage skipping CPP and AR. :class:`StageMachine` is the explicit state machine and
refuses any other order; :func:`run_cascade` drives it. After every stage the run proves that
nothing owned by an earlier stage moved (:class:`~trainer.ownership.FrozenSnapshot`) and that the
earlier objectives' scores s_t on a fixed probe set are bit-identical — failing loudly otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from csmf.errors import CsmfError, OwnershipError
from csmf.towers import TwoTower
from trainer.config import RunConfig
from trainer.encoding import Encoded, StageExamples, stage_examples
from trainer.evaluate import validation_recall
from trainer.losses import aml_margin, log_q, sampled_softmax_loss, softmax_logits
from trainer.ownership import FrozenSnapshot, StageParams, mark_only_stage_trainable, unfreeze_all
from trainer.pruning import prune_stage

Log = Callable[[str], None]


class CascadeStateError(CsmfError, RuntimeError):
    """A cascade step was requested out of order."""


class Phase(StrEnum):
    START = "start"
    TRAIN = "train"
    PRUNE = "prune"
    RECOVER = "recover"
    FREEZE = "freeze"
    DONE = "done"


class StageMachine:
    """START → (TRAIN → PRUNE → [RECOVER] → FREEZE)* → TRAIN → FREEZE → DONE.

    The last stage never prunes (nothing is left to free units for); RECOVER only when AR is on.
    """

    def __init__(self, n_stages: int, recover: bool = True) -> None:
        if n_stages < 1:
            raise CascadeStateError(f"a cascade needs at least one stage, got {n_stages}")
        self.n_stages, self.recover = n_stages, recover
        self.stage, self.phase = 0, Phase.START

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1

    def allowed(self) -> set[Phase]:
        p = self.phase
        if p is Phase.START:
            return {Phase.TRAIN}
        if p is Phase.TRAIN:
            return {Phase.FREEZE} if self.last else {Phase.PRUNE}
        if p is Phase.PRUNE:
            return {Phase.RECOVER} if self.recover else {Phase.FREEZE}
        if p is Phase.RECOVER:
            return {Phase.FREEZE}
        if p is Phase.FREEZE:
            return {Phase.DONE} if self.last else {Phase.TRAIN}
        return set()

    def advance(self, to: Phase) -> None:
        if to not in self.allowed():
            allowed = ", ".join(sorted(a.value for a in self.allowed())) or "nothing"
            raise CascadeStateError(
                f"stage {self.stage} is in phase {self.phase.value!r}: cannot go to {to.value!r} "
                f"(allowed: {allowed})"
            )
        if self.phase is Phase.FREEZE and to is Phase.TRAIN:
            self.stage += 1
        self.phase = to


# --------------------------------------------------------------------------- one training step


def upstream_scores(e: Tensor, v: Tensor, model: TwoTower, stage: int, cfg: RunConfig) -> Tensor:
    """up(u_b, j) for every row and candidate column, (B, C), no gradient (DESIGN §2 AML).

    'prob' (the paper): the product of the upstream objectives' sigmoid probabilities
    prod_{s<t} sigmoid(s_s / temperature) — at stage 1 that is sigmoid(s_0 / temperature), a
    monotone transform of s_0 that keeps Δ in [-1, 1] at every stage, so sigma and eta mean the
    same thing throughout. 'logit': the previous stage's logit s_{t-1} / temperature (unbounded Δ).
    """
    with torch.no_grad():
        masks = model.objective_masks()  # (T, D)
        logits = [(e * masks[t]) @ v.T / cfg.loss.temperature for t in range(stage)]  # (B, C) each
        if cfg.loss.aml_upstream == "logit":
            return logits[-1]
        return torch.stack([torch.sigmoid(x) for x in logits]).prod(0)


def batch_loss(
    model: TwoTower,
    enc: Encoded,
    ex: StageExamples,
    idx: np.ndarray,
    stage: int,
    objective: str,
    cfg: RunConfig,
    rng: np.random.Generator,
) -> Tensor:
    """Sampled-softmax loss of view ``stage`` on the examples ``idx`` (DESIGN §2 'Loss')."""
    lc = cfg.loss
    user, pos = ex.user[idx], ex.item[idx]
    if cfg.train.history == "others":  # the whole train history but the target itself
        e = model.user(enc.user_batch(user, drop=pos), stage)  # (B, D)
    else:  # next-item: only events strictly earlier than the example
        e = model.user(enc.user_batch(user, ex.hist_end[idx]), stage)  # (B, D)
    if lc.negatives == "catalogue":
        return catalogue_loss(model, enc, e, pos, stage, cfg)
    cols = pos
    if lc.extra_negatives:
        cols = np.concatenate([pos, rng.integers(0, enc.n_items, lc.extra_negatives)])
    v = model.item(enc.item_batch(cols), stage)  # (C, D)
    pos_t, cols_t = torch.as_tensor(pos), torch.as_tensor(cols)
    correction = (
        log_q(ex.item_prob, cols_t, len(pos), lc.extra_negatives, enc.n_items) if lc.log_q else None
    )
    margin = None
    if stage >= 1 and lc.aml:
        up = upstream_scores(e.detach(), v.detach(), model, stage, cfg)  # (B, C)
        margin = aml_margin(up.diagonal(), up, lc.sigma, lc.eta)
    hard_v = hard_items = None
    if objective == "exposure" and lc.request_negatives and enc.candidates is not None:
        hard = enc.candidates.sample(ex.request[idx], lc.request_negatives, rng)  # (B, R)
        if (hard >= 0).any():
            hard_items = torch.as_tensor(hard)
            hv = model.item(enc.item_batch(np.maximum(hard, 0).reshape(-1)), stage)
            hard_v = hv.view(len(idx), lc.request_negatives, -1)  # (B, R, D)
    logits = softmax_logits(
        e, v, pos_t, cols_t, lc.temperature, correction, margin, hard_v, hard_items
    )
    return sampled_softmax_loss(logits)


def catalogue_loss(
    model: TwoTower, enc: Encoded, e: Tensor, pos: np.ndarray, stage: int, cfg: RunConfig
) -> Tensor:
    """Exact softmax of view ``stage`` over the whole catalogue (no sampling, so no log-Q):
    every item but the positive is a negative; AML adds its gap to every negative."""
    lc = cfg.loss
    v = model.item(enc.item_batch(np.arange(enc.n_items)), stage)  # (N, D)
    pos_t = torch.as_tensor(pos)
    logits = e @ v.T / lc.temperature  # (B, N)
    if stage >= 1 and lc.aml:
        up = upstream_scores(e.detach(), v.detach(), model, stage, cfg)  # (B, N)
        up_pos = up.gather(1, pos_t.unsqueeze(1)).squeeze(1)  # (B,)
        margin = aml_margin(up_pos, up, lc.sigma, lc.eta)
        margin = margin.scatter(1, pos_t.unsqueeze(1), 0.0)  # the positive gets no gap
        logits = logits + margin
    return F.cross_entropy(logits, pos_t)


def run_epochs(
    model: TwoTower,
    enc: Encoded,
    ex: StageExamples,
    stage: int,
    objective: str,
    params: StageParams,
    cfg: RunConfig,
    epochs: int,
    rng: np.random.Generator,
    desc: str,
    progress: bool,
) -> list[float]:
    """Train ``params`` for ``epochs`` over ``ex`` with a fresh optimizer; mean loss per epoch."""
    tc = cfg.train
    opt = params.optimizer(tc.stage_lr(stage))
    model.train()
    bs = tc.batch_size
    steps = (len(ex) + bs - 1) // bs
    losses = []
    bar = tqdm(total=epochs * steps, desc=desc, disable=not progress, leave=False, unit="step")
    for _ in range(epochs):
        perm = rng.permutation(len(ex))
        total, count = 0.0, 0
        for lo in range(0, len(perm), bs):
            idx = perm[lo : lo + bs]
            bar.update(1)
            if len(idx) < 2:  # a softmax over one candidate teaches nothing
                continue
            loss = batch_loss(model, enc, ex, idx, stage, objective, cfg, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params.mask_gradients(tc.weight_decay)
            opt.step()
            if tc.restore_each_step:
                params.restore_frozen()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return losses


# --------------------------------------------------------------------------- the cascade


def probe_scores(model: TwoTower, enc: Encoded, probe: tuple[np.ndarray, np.ndarray]) -> Tensor:
    """s_t for every objective on fixed (user, item) pairs, (P, T)."""
    with torch.no_grad():
        e = model.user(enc.user_batch(probe[0]))
        v = model.item(enc.item_batch(probe[1]))
        return model.objective_scores(e, v)


def run_cascade(
    model: TwoTower,
    enc: Encoded,
    cfg: RunConfig,
    log: Log = print,
    progress: bool = True,
    on_freeze: Callable[[int, TwoTower], None] | None = None,
) -> dict:
    """Train every stage of the cascade in place; return per-stage metrics.

    ``on_freeze(t, model)`` is called right after stage t froze (tests record snapshots there).
    """
    cc, tc = cfg.cascade, cfg.train
    objectives = cfg.objectives
    rng = np.random.default_rng(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    sm = StageMachine(len(objectives), recover=cc.accuracy_recovery)
    n_probe = min(256, enc.n_users)
    probe = (rng.integers(0, enc.n_users, n_probe), rng.integers(0, enc.n_items, n_probe))
    frozen_scores: list[Tensor] = []  # s_t on the probe, recorded when stage t froze
    stages = []
    for t, objective in enumerate(objectives):
        start = time.perf_counter()
        sm.advance(Phase.TRAIN)
        snapshot = FrozenSnapshot.take(model, t)
        ex = stage_examples(enc, objective)
        name = f"stage {t} ({objective})"
        log(f"{name}: {len(ex):,} train positives")
        params = mark_only_stage_trainable(model, t)
        rec: dict = {"objective": objective, "positives": len(ex), "trainable": params.count()}
        rec["loss"] = run_epochs(
            model, enc, ex, t, objective, params, cfg, tc.stage_epochs(t), rng, name, progress
        )
        rec["val_recall"] = {"trained": _val(model, enc, t, objective, cfg)}
        if not sm.last:
            sm.advance(Phase.PRUNE)
            rec["slices"] = prune_stage(
                model, t, cc.tau, cc.pruning, cc.min_keep, cc.min_free, cc.freed_init, gen
            )
            rec["val_recall"]["pruned"] = _val(model, enc, t, objective, cfg)
            if cc.accuracy_recovery:
                sm.advance(Phase.RECOVER)
                params = mark_only_stage_trainable(model, t)
                sub = ex.subset(cc.rho, rng)
                rec["ar_loss"] = run_epochs(
                    model, enc, sub, t, objective, params, cfg, tc.ar_epochs, rng,
                    f"{name} AR", progress,
                )  # fmt: skip
                rec["val_recall"]["recovered"] = _val(model, enc, t, objective, cfg)
        sm.advance(Phase.FREEZE)
        unfreeze_all(model)
        snapshot.verify(model)
        scores = probe_scores(model, enc, probe)
        for s, before in enumerate(frozen_scores):
            if not torch.equal(scores[:, s], before):
                raise OwnershipError(f"stage {t} changed the scores s_{s} of frozen stage {s}")
        frozen_scores.append(scores[:, t].clone())
        if on_freeze is not None:
            on_freeze(t, model)
        rec["seconds"] = time.perf_counter() - start
        stages.append(rec)
        _log_stage(log, name, rec, cfg.eval.n)
    sm.advance(Phase.DONE)
    return {"stages": stages, "output_slices": output_slices(model)}


def output_slices(model: TwoTower) -> list[int]:
    """Output dims owned by each objective — the [d | o | r] slice sizes."""
    return torch.bincount(model.output_owner.long(), minlength=model.cfg.num_objectives).tolist()


def _val(model: TwoTower, enc: Encoded, t: int, objective: str, cfg: RunConfig) -> float:
    return validation_recall(model, enc, t, objective, cfg.eval.n, cfg.eval.val_users)


def _log_stage(log: Log, name: str, rec: dict, n: int) -> None:
    vr = " → ".join(f"{k} {v:.4f}" for k, v in rec["val_recall"].items())
    msg = f"{name}: loss {rec['loss'][-1]:.4f}" if rec["loss"] else f"{name}: no epochs"
    log(f"{msg}, val Recall@{n} {vr}, {rec['seconds']:.1f}s")
    if "slices" in rec:
        parts = [f"{g} {s['kept']}/{s['kept'] + s['freed']}" for g, s in rec["slices"].items()]
        log(f"  CPP kept/units per layer: {', '.join(parts)}")
