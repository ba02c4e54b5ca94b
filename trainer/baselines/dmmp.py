"""DMMP — distillation-based multi-task multi-tower model.

Paper: Yi, Tang, Zeng, Zhang, Xu, "DMMP: A distillation-based multi-task multi-tower learning
model for personalized recommendation", Knowledge-Based Systems 284 (2024) 111236. An MTL teacher
with task-shared and task-specific experts and a customised multi-gate network, with auxiliary
pCTR and pCTCVR tasks over the entire space, distils into a multi-tower candidate-generation
student whose user-preference gating network learns, per user, how much each task's score
counts; an adaptive weighting strategy balances the total loss.

Here:

- teacher: :class:`trainer.baselines.teacher.Teacher` with 1 shared and 1 task-specific expert
  per task (CGC gates), pCTR / pCTCVR on every train exposure;
- student, "three towers": one user tower per objective of the cascade (exposure, click,
  conversion: shared feature tables, one MLP head of ``model.hidden`` → ``out_dim`` each) and
  one item tower (CSMF's), score s_t(u, i) = <e_t(u), v(i)>; a user-preference gate
  α(u) = softmax(W·x_u) over the objectives (x_u: the user's embedded features);
- losses: every objective's sampled softmax on its own positives (the same negatives, log-Q,
  temperature, history and epoch budget as CSMF's stage t), plus the distilled task on the
  gated score Σ_t α_t(u)·s_t: the exposure stage's sampled softmax over the train exposures
  drawn in proportion to the teacher's value (k_click·pCTR + k_conv·pCTCVR)/(k_click + k_conv)
  (:func:`trainer.baselines.joint.distilled_exposures`) — how the gate learns which objective
  counts for whom. The paper distils the teacher's pCTR / pCTCVR into the student's task
  scores pointwise; that (calibrated BCE on the exposed pairs, and a listwise fit over in-batch
  pairs) taught no ranking against the catalogue and sank every view on the synthetic validation
  split, so the teacher's knowledge enters as sample weights, as in :mod:`.dtml`;
- adaptive loss weighting: the paper's exact scheme is not public; we use dynamic weight average
  (Liu et al., CVPR 2019) over [retrieval, distilled], weights summing to 2
  (homoscedastic-uncertainty weights, tried first, shrank the sampled-softmax term — a loss
  of ~7 against BCEs of ~0.5 — to a twentieth: on the synthetic validation split the exposure
  view fell far below the same tower trained alone);
- budget: the most epochs of any stage; an epoch is at least one pass of distillation batches
  over the train exposures (the objectives' batches run out earlier and sit out);
- which features feed the gate and the number of experts are not public: chosen as above.

Served: the weighted multi-objective query q(u) = Σ_t k_t·α_t(u)·e_t(u) against one ``out_dim``
vector per item — one search, exact for the personalised fused score Σ_t k_t α_t(u) s_t(u, i).
The query-time weights k multiply the learned personal weights α(u).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from csmf.towers import Batch, Tower
from trainer.baselines.joint import (
    DynamicWeightAverage,
    distilled_exposures,
    train_joint,
    with_changes,
)
from trainer.baselines.teacher import embed_width, embedding_only, mlp, train_teacher
from trainer.cascade import batch_loss
from trainer.config import RunConfig
from trainer.encoding import Encoded


class DMMPStudent(nn.Module):
    def __init__(self, cfg: RunConfig, enc: Encoded) -> None:
        super().__init__()
        its = enc.item_vocab.sizes()
        self.user_embed = embedding_only(
            Tower(cfg.features.user, enc.user_vocab.sizes(), cfg.model, its["id"])
        )
        width = embed_width(self.user_embed)
        self.n_objectives = len(cfg.objectives)
        heads = []
        for _ in range(self.n_objectives):
            body = mlp([width, *cfg.model.hidden])
            body.append(
                nn.Linear(cfg.model.hidden[-1] if cfg.model.hidden else width, cfg.model.out_dim)
            )
            heads.append(body)
        self.heads = nn.ModuleList(heads)
        self.gate = nn.Linear(width, self.n_objectives)
        self.item_tower = Tower(cfg.features.item, its, cfg.model)
        self.out_dim = cfg.model.out_dim
        self.gated = False  # user(batch, stage) → the gated vector Σ_t α_t e_t (distillation)

    def towers(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(B, T, D) per-objective user vectors and (B, T) gate weights."""
        x = self.user_embed.embed(batch)
        e = torch.stack([h(x) for h in self.heads], dim=1)
        return e, torch.softmax(self.gate(x), dim=1)

    def user(self, batch: Batch, stage: int | None = None) -> Tensor:
        """Objective ``stage``'s user vector; None: [e_0 | ... | e_{T-1} | α] (B, T·D + T)."""
        e, alpha = self.towers(batch)
        if self.gated:
            return (alpha.unsqueeze(-1) * e).sum(1)
        if stage is not None:
            return e[:, stage]
        return torch.cat([e.flatten(1), alpha], dim=1)

    def item(self, batch: Batch, stage: int | None = None) -> Tensor:
        return self.item_tower(batch)


def fused_queries(user_out: Tensor, weights: Sequence[float], t: int, d: int) -> Tensor:
    """q(u) = Σ_t k_t·α_t(u)·e_t(u) from ``user(batch, None)`` outputs (U, T·D + T)."""
    e = user_out[:, : t * d].view(-1, t, d)
    alpha = user_out[:, t * d :]
    k = torch.as_tensor([float(w) for w in weights], dtype=e.dtype)
    return ((alpha * k).unsqueeze(-1) * e).sum(1)


def train_dmmp(cfg: RunConfig, enc: Encoded) -> tuple[DMMPStudent, dict]:
    teacher, teacher_losses = train_teacher(cfg, enc, shared=1, specific=1)
    dist = distilled_exposures(teacher, enc, cfg)
    torch.manual_seed(cfg.train.seed)
    model = DMMPStudent(cfg, enc)
    weights = DynamicWeightAverage(2)
    bs = cfg.train.batch_size
    cfg_loss = with_changes(cfg, {"loss": {"aml": False}})

    def distill(step: int, rng: np.random.Generator) -> list[Tensor]:
        if step == 0:
            weights.end_epoch()
        idx = dist.draw(rng, bs)
        model.gated = True
        try:
            exposure = cfg.objectives[0]
            return [batch_loss(model, enc, dist.examples, idx, 0, exposure, cfg_loss, rng)]
        finally:
            model.gated = False

    def combine(retrieval: list[Tensor], distilled: list[Tensor]) -> Tensor:
        return weights([torch.stack(retrieval).sum() if retrieval else None, *distilled])

    steps = -(-len(dist.value) // bs)
    losses = train_joint(
        model, cfg, enc, cfg.objectives, extra=distill, combine=combine, min_steps=steps
    )
    return model, {
        "teacher_loss": teacher_losses,
        "loss": losses,
        "loss_weights": weights.weights.tolist(),
    }
