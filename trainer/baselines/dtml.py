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
  every other method — and (b) the distilled task: the exposure stage's sampled softmax over the
  train exposures drawn in proportion to the teacher's value of each,
  y = (k_click·pCTR + k_conv·pCTCVR) / (k_click + k_conv) with k = ``eval.weights``
  (:func:`trainer.baselines.joint.distilled_exposures`): the student learns to retrieve what the
  teacher expects to be clicked and converted, against in-batch (or catalogue) negatives. The
  paper distils the teacher's score into the student pointwise; two pointwise variants tried
  first (BCE of a calibrated student score against y on the exposed pairs; a listwise fit to
  the teacher's y over in-batch pairs the teacher never saw exposed) taught the student no
  ranking against the catalogue: on the synthetic validation split both fell far below the click
  tower trained alone, so the teacher's knowledge enters as sample weights instead;
- not public / chosen: the weights k that make one target out of two (the other methods'
  fused-ranking weights), equal weight of the two terms, the teacher's budget (the exposure
  stage's epochs and lr), the student's (the click stage's epochs; an epoch is one pass of
  distillation batches over the train exposures, the click batches running out earlier).

Served: one ``out_dim`` vector per item; the weighted multi-objective query is the single
user vector (the weights were fixed at distillation time — changing them means retraining).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from trainer.baselines.joint import distilled_exposures, train_joint, with_changes
from trainer.baselines.teacher import train_teacher
from trainer.baselines.two_tower import TwoTowerStudent
from trainer.cascade import batch_loss
from trainer.config import RunConfig
from trainer.encoding import Encoded


def train_dtml(cfg: RunConfig, enc: Encoded) -> tuple[TwoTowerStudent, dict]:
    teacher, teacher_losses = train_teacher(cfg, enc, shared=1, specific=0)
    dist = distilled_exposures(teacher, enc, cfg)
    torch.manual_seed(cfg.train.seed)
    model = TwoTowerStudent(cfg, enc)
    bs = cfg.train.batch_size
    cfg_loss = with_changes(cfg, {"loss": {"aml": False}})

    def distill(step: int, rng: np.random.Generator) -> list[Tensor]:
        idx = dist.draw(rng, bs)
        exposure = cfg.objectives[0]
        return [batch_loss(model, enc, dist.examples, idx, 0, exposure, cfg_loss, rng)]

    steps = -(-len(dist.value) // bs)  # as many distillation steps as exposure batches
    losses = train_joint(model, cfg, enc, ["click"], extra=distill, min_steps=steps)
    return model, {"teacher_loss": teacher_losses, "loss": losses}
