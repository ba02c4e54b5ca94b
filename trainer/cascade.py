"""The CSMF cascade (docs/design.md#the-cascade): for each objective t in order,

    train (units owned by t) → CPP (free units for t + 1) → AR (kept units, fraction rho) → freeze

with the last stage skipping CPP and AR. :class:`StageMachine` is the explicit state machine and
refuses any other order; :func:`run_cascade` drives it. After every stage the run proves that
nothing owned by an earlier stage moved (:class:`~trainer.ownership.FrozenSnapshot`) and that the
earlier objectives' scores s_t on a fixed probe set are bit-identical — failing loudly otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import csmf.objectives as funnel
from csmf.errors import CsmfError, OwnershipError
from csmf.progress import progress_bar
from csmf.towers import TwoTower
from trainer.config import RunConfig
from trainer.distributed import SINGLE, Dist
from trainer.encoding import Encoded, Examples, StageExamples, stage_examples
from trainer.evaluate import validation_recall
from trainer.losses import aml_margin, log_q, sampled_softmax_loss, softmax_logits
from trainer.moments import Moments, capture
from trainer.ownership import (
    FrozenSnapshot,
    StageOptimizer,
    StageParams,
    mark_only_stage_trainable,
    unfreeze_all,
)
from trainer.prefetch import Prefetcher
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

    The last stage prunes only with ``prune_last`` (``cascade.last_tau``: units left for an
    objective added later); RECOVER only when AR is on.
    """

    def __init__(self, n_stages: int, recover: bool = True, prune_last: bool = False) -> None:
        if n_stages < 1:
            raise CascadeStateError(f"a cascade needs at least one stage, got {n_stages}")
        self.n_stages, self.recover, self.prune_last = n_stages, recover, prune_last
        self.stage, self.phase = 0, Phase.START

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1

    def allowed(self) -> set[Phase]:
        p = self.phase
        if p is Phase.START:
            return {Phase.TRAIN}
        if p is Phase.TRAIN:
            return {Phase.FREEZE} if self.last and not self.prune_last else {Phase.PRUNE}
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
    """up(u_b, j) for every row and candidate column, (B, C), no gradient
    (docs/design.md#loss-and-aml).

    'prob' (the paper): the product of the upstream objectives' sigmoid probabilities
    prod_{s<t} sigmoid(s_s / temperature) — at stage 1 that is sigmoid(s_0 / temperature), a
    monotone transform of s_0 that keeps Δ in [-1, 1] at every stage, so sigma and eta mean the
    same thing throughout. 'logit': the previous stage's logit s_{t-1} / temperature (unbounded Δ).
    """
    with torch.no_grad():
        owner = model.output_owner
        s = up = None
        for t in range(stage):  # s_t = s_{t-1} + the dims objective t owns: sliced, not masked
            dims = torch.nonzero(owner == t).squeeze(1)
            et, vt = e[:, dims] / cfg.loss.temperature, v[:, dims]  # (B, d_t), (C, d_t)
            s = torch.mm(et, vt.T) if s is None else s.addmm_(et, vt.T)  # (B, C)
            if cfg.loss.aml_upstream == "prob":
                p = torch.sigmoid(s)
                up = p if up is None else up.mul_(p)  # one (B, C) buffer however long the cascade
        return s if cfg.loss.aml_upstream == "logit" else up


def batch_loss(
    model: TwoTower,
    enc: Encoded,
    ex: StageExamples,
    idx: np.ndarray,
    stage: int,
    objective: str,
    cfg: RunConfig,
    rng: np.random.Generator,
    inputs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Sampled-softmax loss of view ``stage`` on the examples ``idx`` (docs/design.md#loss-and-aml);
    ``inputs``: the users' tower inputs if already assembled (:func:`user_inputs`)."""
    lc = cfg.loss
    pos = ex.item[idx]
    _, dropout = cfg.train.stage_history(stage)
    if inputs is None:
        inputs = user_inputs(enc, ex, idx, stage, cfg)
    e = model.user(drop_history(inputs, dropout, rng), stage)  # (B, D)
    if lc.negatives == "catalogue":
        return catalogue_loss(model, enc, e, pos, stage, cfg)
    cols = pos
    if lc.extra_negatives:
        cols = np.concatenate([pos, rng.integers(0, enc.n_items, lc.extra_negatives)])
    v = model.item(enc.item_batch(cols), stage)  # (C, D)
    pos_t, cols_t = torch.as_tensor(pos, device=e.device), torch.as_tensor(cols, device=e.device)
    correction = (
        log_q(ex.item_prob.to(e.device), cols_t, len(pos), lc.extra_negatives, enc.n_items)
        if lc.log_q
        else None
    )
    margin = None
    if stage >= 1 and lc.aml:
        up = upstream_scores(e.detach(), v.detach(), model, stage, cfg)  # (B, C)
        margin = aml_margin(up.diagonal(), up, lc.sigma, lc.eta)
    hard_v = hard_items = None
    hard = exposure_negatives(enc, ex, idx, objective, cfg, rng)  # (B, R + P) or None
    if hard is not None and (hard >= 0).any():
        hard_items = torch.as_tensor(hard, device=e.device)
        hv = model.item(enc.item_batch(np.maximum(hard, 0).reshape(-1)), stage)
        hard_v = hv.view(len(idx), hard.shape[1], -1)  # (B, R + P, D)
    logits = softmax_logits(
        e, v, pos_t, cols_t, lc.temperature, correction, margin, hard_v, hard_items
    )
    return sampled_softmax_loss(logits)


def exposure_negatives(
    enc: Encoded,
    ex: StageExamples,
    idx: np.ndarray,
    objective: str,
    cfg: RunConfig,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """Per-row negatives of the exposure stage besides the in-batch ones, (B, R + P) item rows
    (-1 = none), or None at other stages or when both are off: R = ``loss.request_negatives``
    unexposed candidates of the request (candidates.parquet), P = ``loss.page_negatives`` items
    shown but not clicked in the same page view. Neither is drawn from a known distribution, so
    neither gets a log-Q correction (losses.softmax_logits masks -1 and the row's positive)."""
    lc = cfg.loss
    if funnel.get(objective).column is not None:
        return None
    parts = []
    if lc.request_negatives and enc.candidates is not None:
        parts.append(enc.candidates.sample(ex.request[idx], lc.request_negatives, rng))  # (B, R)
    if lc.page_negatives:
        pages = enc.page_views()
        parts.append(pages.sample(ex.request[idx], ex.item[idx], lc.page_negatives, rng))  # (B, P)
    return np.concatenate(parts, axis=1) if parts else None


def user_inputs(
    enc: Encoded, ex: StageExamples, idx: np.ndarray, stage: int, cfg: RunConfig
) -> dict[str, Tensor]:
    """The user tower's inputs for examples ``idx``, history as stage ``stage`` sees it; no
    randomness, so the input pipeline can assemble them ahead of the step."""
    user, pos = ex.user[idx], ex.item[idx]
    mode, _ = cfg.train.stage_history(stage)
    if mode == "others":  # the whole train history but the target itself
        return enc.user_batch(user, drop=pos)
    return enc.user_batch(user, ex.hist_end[idx])  # next-item: events strictly earlier


def drop_history(inputs: dict[str, Tensor], p: float, rng: np.random.Generator) -> dict:
    """Blank each history slot with probability ``p`` (training only): the user vector must then
    predict held-out items from a random part of the history, as a denoising autoencoder does,
    instead of memorising the user's whole set."""
    if p <= 0 or "history" not in inputs:
        return inputs
    h = inputs["history"]  # (B, L)
    keep = torch.as_tensor(rng.random(tuple(h.shape)) >= p, device=h.device)
    return {**inputs, "history": h * keep}


def catalogue_loss(
    model: TwoTower, enc: Encoded, e: Tensor, pos: np.ndarray, stage: int, cfg: RunConfig
) -> Tensor:
    """Exact softmax of view ``stage`` over the whole catalogue (no sampling, so no log-Q):
    every item but the positive is a negative; AML adds its gap to every negative."""
    lc = cfg.loss
    v = model.item(enc.item_batch(np.arange(enc.n_items)), stage)  # (N, D)
    pos_t = torch.as_tensor(pos, device=e.device)
    logits = e @ v.T / lc.temperature  # (B, N)
    if stage >= 1 and lc.aml:
        up = upstream_scores(e.detach(), v.detach(), model, stage, cfg)  # (B, N)
        up_pos = up.gather(1, pos_t.unsqueeze(1)).squeeze(1)  # (B,)
        margin = aml_margin(up_pos, up, lc.sigma, lc.eta)
        margin = margin.scatter(1, pos_t.unsqueeze(1), 0.0)  # the positive gets no gap
        logits = logits + margin
    return F.cross_entropy(logits, pos_t)


EpochHook = Callable[[int, list[float], torch.optim.Optimizer], None]


def run_epochs(
    model: TwoTower,
    enc: Encoded,
    ex: Examples,
    stage: int,
    objective: str,
    params: StageParams,
    cfg: RunConfig,
    epochs: int,
    rng: np.random.Generator,
    desc: str,
    progress: bool,
    *,
    sample_rng: np.random.Generator | None = None,
    dist: Dist = SINGLE,
    start_epoch: int = 0,
    losses: list[float] | None = None,
    opt_state: dict | None = None,
    on_epoch: EpochHook | None = None,
    log: Log | None = None,
    data_wait: list[float] | None = None,
    optimizer: StageOptimizer | None = None,
) -> list[float]:
    """Train ``params`` for ``epochs`` over ``ex``; mean loss per epoch. ``optimizer``: one over
    ``params`` to step (a warm start's, holding the moments it carried; the caller keeps it to
    read them afterwards); default a fresh one.

    ``rng`` draws the batch order (identical on every rank); ``sample_rng`` (default ``rng``) the
    sampled negatives. Resuming: ``start_epoch`` epochs are done, their ``losses`` and the
    optimizer's ``opt_state`` given. ``on_epoch(epochs_done, losses, optimizer)`` after each epoch.
    ``progress``: a bar on a terminal; with stderr redirected, one ``log`` line per epoch instead.
    Batches and their user inputs are assembled ``train.prefetch`` steps ahead in a background
    thread; the seconds the step waited for them are added to ``data_wait[0]``.
    """
    tc = cfg.train
    sample_rng = rng if sample_rng is None else sample_rng
    opt = optimizer if optimizer is not None else params.optimizer(tc.stage_lr(stage))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    model.train()
    steps = ex.steps(tc.batch_size, dist.world)
    if tc.max_steps:
        steps = min(steps, tc.max_steps)
    losses = list(losses or [])
    bar = progress_bar((epochs - start_epoch) * steps, desc, "step", progress, leave=False)
    lines = progress and bar.disable and log is not None  # redirected: one line per epoch
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()  # this epoch's time, in its log line
        total, count = 0.0, 0
        batches = ex.batches(rng, tc.batch_size, dist.rank, dist.world)  # shared draws: now
        with Prefetcher(_with_inputs(batches, enc, stage, cfg, steps), tc.prefetch) as feed:
            for (part, idx, n_global), inputs in feed:
                bar.update(1)
                if n_global < 2 * dist.world:  # a softmax over one candidate teaches nothing
                    continue
                opt.zero_grad(set_to_none=True)
                if len(idx) >= 2:
                    loss = batch_loss(
                        model, enc, part, idx, stage, objective, cfg, sample_rng, inputs
                    )
                    loss.backward()
                    total += loss.item() * len(idx)
                    count += len(idx)
                dist.average_gradients(params.params, params.row_sparse)
                params.mask_gradients(tc.weight_decay)
                opt.step()
                if tc.restore_each_step:
                    params.restore_frozen()
        if data_wait is not None:
            data_wait[0] += feed.wait_seconds
        total, count = dist.sum_floats(total, count)
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if lines:
            took = time.perf_counter() - t0
            log(f"  {desc} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({took:.1f}s)")
        if on_epoch is not None:
            on_epoch(epoch + 1, losses, opt)
    bar.close()
    return losses


def _with_inputs(batches, enc: Encoded, stage: int, cfg: RunConfig, steps: int):
    """The first ``steps`` batches, each with its users' tower inputs (None for a batch this
    rank skips)."""
    for step, b in enumerate(batches):
        if step == steps:  # train.max_steps
            return
        inputs = user_inputs(enc, b.part, b.rows, stage, cfg) if len(b.rows) >= 2 else None
        yield b, inputs


# --------------------------------------------------------------------------- the cascade


def probe_scores(model: TwoTower, enc: Encoded, probe: tuple[np.ndarray, np.ndarray]) -> Tensor:
    """s_t for every objective on fixed (user, item) pairs, (P, T)."""
    with torch.no_grad():
        e = model.user(enc.user_batch(probe[0]))
        v = model.item(enc.item_batch(probe[1]))
        return model.objective_scores(e, v)


@dataclass
class Progress:
    """Where a cascade is, to resume it bit-identically (with the model's state dict).

    ``phase`` is TRAIN or RECOVER with ``epoch`` epochs of it done (``opt_state`` = the optimizer
    then), or FREEZE: stage ``stage`` finished. ``rec`` is the current stage's record so far.
    """

    stage: int
    phase: Phase
    epoch: int
    stages: list[dict]
    rec: dict
    probe: tuple[np.ndarray, np.ndarray]
    frozen_scores: list[Tensor]
    rng: dict  # numpy bit-generator state of the shared (batch-order) rng
    sample_rngs: list[dict]  # per rank (single process: empty, the shared rng samples)
    gen: Tensor  # torch.Generator state (CPP 'random', reinit)
    torch_rng: Tensor  # torch's global RNG
    opt_state: dict | None = None
    subset: np.ndarray | None = None  # AR example indices
    seconds: float = 0.0  # time spent in the current stage before this point
    extra: dict = field(default_factory=dict)


CheckpointHook = Callable[[Progress], None]


def run_cascade(
    model: TwoTower,
    enc: Encoded,
    cfg: RunConfig,
    log: Log = print,
    progress: bool = True,
    on_freeze: Callable[[int, TwoTower], None] | None = None,
    *,
    resume: Progress | None = None,
    on_checkpoint: CheckpointHook | None = None,
    dist: Dist = SINGLE,
    moments: Moments | None = None,
) -> dict:
    """Train every stage of the cascade in place; return per-stage metrics.

    ``on_freeze(t, model)`` is called right after stage t froze (tests record snapshots there).
    ``on_checkpoint(progress)`` after every epoch and every frozen stage (every rank calls it;
    the writer decides who writes); ``resume`` continues from such a point — ``model`` must
    already hold that point's state dict. ``dist`` is the process group (trainer.distributed).
    ``moments``: filled with each stage's final Adam moments (trainer/moments.py) for a later
    warm start (stages finished before a resume point have none).
    """
    cc, tc = cfg.cascade, cfg.train
    objectives = cfg.objectives
    rng = np.random.default_rng(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    # one process: the shared rng also samples negatives (the historical stream); several: each
    # rank samples its own negatives, the batch order stays shared
    sample_rng = np.random.default_rng([tc.seed, 7919, dist.rank]) if dist.active else rng
    sm = StageMachine(len(objectives), recover=cc.accuracy_recovery, prune_last=cc.last_tau > 0)
    if cfg.loss.page_negatives and any(funnel.get(o).column is None for o in objectives):
        enc.page_views()  # no page views (or streamed): fail before the first step, not at it
    if resume is None:
        n_probe = min(256, enc.n_users)
        probe = (rng.integers(0, enc.n_users, n_probe), rng.integers(0, enc.n_items, n_probe))
        frozen_scores: list[Tensor] = []  # s_t on the probe, recorded when stage t froze
        stages: list[dict] = []
    else:
        probe, stages = resume.probe, list(resume.stages)
        device = model.output_owner.device
        frozen_scores = [s.to(device) for s in resume.frozen_scores]
        rng.bit_generator.state = resume.rng
        if dist.active and resume.sample_rngs:
            sample_rng.bit_generator.state = resume.sample_rngs[dist.rank % len(resume.sample_rngs)]
        gen.set_state(resume.gen)
        torch.set_rng_state(resume.torch_rng)
        sm.stage, sm.phase = resume.stage, resume.phase

    writing = [0.0]  # seconds spent in on_checkpoint (kept out of train_seconds)

    def checkpoint(t: int, phase: Phase, epoch: int, rec: dict, started: float, **kw) -> None:
        if on_checkpoint is None:
            return
        t_write = time.perf_counter()
        samples = dist.gather_objects(sample_rng.bit_generator.state) if dist.active else []
        on_checkpoint(
            Progress(
                stage=t, phase=phase, epoch=epoch, stages=list(stages), rec=dict(rec),
                probe=probe, frozen_scores=list(frozen_scores), rng=rng.bit_generator.state,
                sample_rngs=samples, gen=gen.get_state(), torch_rng=torch.get_rng_state(),
                seconds=time.perf_counter() - started, **kw,
            )
        )  # fmt: skip
        writing[0] += time.perf_counter() - t_write

    for t, objective in enumerate(objectives):
        at = resume if resume is not None and resume.stage == t else None
        if t < len(stages):  # finished before the resume point
            continue
        start = time.perf_counter() - (at.seconds if at is not None else 0.0)
        if at is None:
            sm.advance(Phase.TRAIN)
        snapshot = FrozenSnapshot.take(model, t)
        ex = stage_examples(enc, objective)
        name = f"stage {t} ({objective})"
        log(f"{name}: {len(ex):,} train positives" + (" (resumed)" if at is not None else ""))
        params = mark_only_stage_trainable(model, t, keep_values=tc.restore_each_step)
        rec: dict = (
            dict(at.rec)
            if at is not None
            else {"objective": objective, "positives": len(ex), "trainable": params.count()}
        )
        in_train = at is None or at.phase is Phase.TRAIN
        opt: StageOptimizer | None = None  # the stage's last optimizer: its moments are kept
        if in_train:
            t_train, w0 = time.perf_counter(), writing[0]
            wait = [0.0]
            opt = params.optimizer(tc.stage_lr(t))
            rec["loss"] = run_epochs(
                model, enc, ex, t, objective, params, cfg, tc.stage_epochs(t), rng, name, progress,
                sample_rng=sample_rng, dist=dist, log=log, data_wait=wait, optimizer=opt,
                start_epoch=at.epoch if at is not None else 0,
                losses=rec.get("loss"), opt_state=at.opt_state if at is not None else None,
                on_epoch=lambda k, losses, opt, t=t, rec=rec, start=start: checkpoint(
                    t, Phase.TRAIN, k, {**rec, "loss": losses}, start,
                    opt_state=opt.state_dict(),
                ),
            )  # fmt: skip
            rec["train_seconds"] = (
                rec.get("train_seconds", 0.0) + time.perf_counter() - t_train - (writing[0] - w0)
            )  # training steps only, without the per-epoch resume.pt writes
            # of which the step waited for input batches (train.prefetch)
            rec["data_wait_seconds"] = rec.get("data_wait_seconds", 0.0) + wait[0]
            rec["val_recall"] = {"trained": _val(model, enc, t, objective, cfg, dist)}
        if not sm.last or sm.prune_last:
            if in_train:
                sm.advance(Phase.PRUNE)
                reduce = dist.mean if dist.active else None
                rec["slices"] = prune_stage(
                    model, t, cc.last_tau if sm.last else cc.tau, cc.pruning, cc.min_keep,
                    cc.min_free, "zero" if sm.last else cc.freed_init, gen,
                    reduce_importance=reduce,
                )  # fmt: skip
                rec["digests"] = {"pruned": dist.check_consistent(model, t, f"stage {t} CPP")}
                rec["val_recall"]["pruned"] = _val(model, enc, t, objective, cfg, dist)
            if cc.accuracy_recovery:
                if in_train:
                    sm.advance(Phase.RECOVER)
                    sub_idx = ex.draw_subset(cc.rho, rng)
                else:
                    sub_idx = at.subset
                params = mark_only_stage_trainable(model, t, keep_values=tc.restore_each_step)
                sub = ex.take(sub_idx, cc.rho)
                opt = params.optimizer(tc.stage_lr(t))
                rec["ar_loss"] = run_epochs(
                    model, enc, sub, t, objective, params, cfg, tc.ar_epochs, rng,
                    f"{name} AR", progress, sample_rng=sample_rng, dist=dist, log=log, optimizer=opt,
                    start_epoch=0 if in_train else at.epoch,
                    losses=None if in_train else rec.get("ar_loss"),
                    opt_state=None if in_train else at.opt_state,
                    on_epoch=lambda k, losses, opt, t=t, rec=rec, start=start, sub=sub_idx: (
                        checkpoint(
                            t, Phase.RECOVER, k, {**rec, "ar_loss": losses}, start,
                            opt_state=opt.state_dict(), subset=sub,
                        )
                    ),
                )  # fmt: skip
                rec["val_recall"]["recovered"] = _val(model, enc, t, objective, cfg, dist)
        sm.advance(Phase.FREEZE)
        if moments is not None and opt is not None:
            moments[str(t)] = capture(model, t, opt)
        unfreeze_all(model)
        snapshot.verify(model)
        rec.setdefault("digests", {})["frozen"] = dist.check_consistent(
            model, t, f"stage {t} frozen"
        )
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
        checkpoint(t, Phase.FREEZE, 0, {}, time.perf_counter())
    sm.advance(Phase.DONE)
    return {"stages": stages, "output_slices": output_slices(model)}


def output_slices(model: TwoTower) -> list[int]:
    """Output dims owned by each objective — the [d | o | r] slice sizes (unowned dims, left by
    ``cascade.last_tau`` for a later objective, are not counted)."""
    t = model.cfg.num_objectives
    return torch.bincount(model.output_owner.long(), minlength=t + 1)[:t].tolist()


def _val(
    model: TwoTower, enc: Encoded, t: int, objective: str, cfg: RunConfig, dist: Dist = SINGLE
) -> float:
    """Validation Recall@N of view t — on rank 0 only (NaN on the others)."""
    if not dist.main:
        return float("nan")
    return validation_recall(model, enc, t, objective, cfg.eval.n, cfg.eval.val_users)


def _log_stage(log: Log, name: str, rec: dict, n: int) -> None:
    vr = " → ".join(f"{k} {v:.4f}" for k, v in rec["val_recall"].items())
    msg = f"{name}: loss {rec['loss'][-1]:.4f}" if rec["loss"] else f"{name}: no epochs"
    log(f"{msg}, val Recall@{n} {vr}, {rec['seconds']:.1f}s")
    if "slices" in rec:
        parts = [f"{g} {s['kept']}/{s['kept'] + s['freed']}" for g, s in rec["slices"].items()]
        log(f"  CPP kept/units per layer: {', '.join(parts)}")
