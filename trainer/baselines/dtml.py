"""DTML — distillation-based multi-task learning for embedding-based retrieval.

Paper: Zhao, Fu, Liang, Ma, Zhao, Jiang, "Distillation based Multi-task Learning: A Candidate
Generation Model for Improving Reading Duration" (arXiv 2102.07142, 2021; CSMF's [37, 38]).
A multi-task teacher models click and the post-click signal (reading duration) with the
dependency "duration only after a click"; its knowledge is distilled into a single two-tower
candidate-generation student, which alone is served (one vector per item).

Here:

- teacher: :class:`trainer.baselines.teacher.Teacher` as a shared-bottom network (one shared
  expert, no gates), pCTR and pCTCVR on every train exposure (entire space). Our post-click signal
  is the conversion (ML-100K: rating 5; synthetic: conversion), not a duration: the dependency is
  the same (it exists only after a click), the label is binary instead of a regression target;
- student: CSMF's own towers (``model.hidden``, ``model.out_dim``; :class:`csmf.towers.Tower`,
  no owners used), trained jointly on (a) the click stage's sampled softmax over click
  positives — the candidate generator's own task, with the negatives, temperature and log-Q of
  every other method — and (b) ranking distillation on train exposures: for a batch of 256
  exposures, the teacher scores every user x item pair of the batch with its fused probability
  y = (k_click·pCTR + k_conv·pCTCVR) / (k_click + k_conv) (k = ``eval.weights``), and the
  student's softmax over the same candidates is fitted to y normalised per user
  (:func:`trainer.baselines.joint.listwise_distill`). The paper distils one target (a
  duration-aware click score); the weights that make it one are our choice, the same the other
  methods' fused rankings use. A pointwise distillation (BCE of a calibrated score against y on
  the exposed pairs only, tried first) taught no ranking against other items: on the synthetic
  validation split it pulled the student far below the click tower trained alone;
- not public / chosen: the distillation weight (1, unweighted sum), the teacher's budget (the
  exposure stage's epochs and lr), the student's (the click stage's epochs; an epoch is one
  pass of distillation batches over the train exposures, the click batches running out
  earlier).

Served: one ``out_dim`` vector per item; the weighted multi-objective query is the single
user vector (the weights were fixed at distillation time — changing them means retraining).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from csmf.towers import Batch, Tower
from trainer.baselines.joint import (
    KD_BATCH,
    listwise_distill,
    pair_batches,
    train_exposures,
    train_joint,
)
from trainer.baselines.teacher import train_teacher
from trainer.config import RunConfig
from trainer.encoding import Encoded


class TwoTowerStudent(nn.Module):
    """Plain two tower; ``user(batch, stage)`` / ``item(batch, stage)`` ignore the stage."""

    def __init__(self, cfg: RunConfig, enc: Encoded) -> None:
        super().__init__()
        its = enc.item_vocab.sizes()
        self.user_tower = Tower(cfg.features.user, enc.user_vocab.sizes(), cfg.model, its["id"])
        self.item_tower = Tower(cfg.features.item, its, cfg.model)

    def user(self, batch: Batch, stage: int | None = None) -> Tensor:
        return self.user_tower(batch)

    def item(self, batch: Batch, stage: int | None = None) -> Tensor:
        return self.item_tower(batch)


def fused_target(p_ctr: Tensor, p_ctcvr: Tensor, k_click: float, k_conv: float) -> Tensor:
    return (k_click * p_ctr + k_conv * p_ctcvr) / (k_click + k_conv)


def train_dtml(cfg: RunConfig, enc: Encoded) -> tuple[TwoTowerStudent, dict]:
    ex = train_exposures(enc)
    teacher, teacher_losses = train_teacher(cfg, enc, shared=1, specific=0, ex=ex)
    k = dict(zip(cfg.objectives, cfg.eval.weights, strict=True))
    torch.manual_seed(cfg.train.seed)
    model = TwoTowerStudent(cfg, enc)
    bs = cfg.train.batch_size

    def distill(step: int, rng: np.random.Generator) -> list[Tensor]:
        idx = rng.integers(0, len(ex), min(KD_BATCH, len(ex)))
        ub, ib = pair_batches(ex, idx, enc)
        p_ctr, p_ctcvr = teacher.pair_probs(ub, ib)
        s = model.user(ub) @ model.item(ib).T
        target = fused_target(p_ctr, p_ctcvr, k["click"], k["conversion"])
        return [listwise_distill(s, target, cfg.loss.temperature)]

    steps = -(-len(ex) // bs)  # as many distillation steps as exposure batches
    losses = train_joint(model, cfg, enc, ["click"], extra=distill, min_steps=steps)
    return model, {"teacher_loss": teacher_losses, "loss": losses}
