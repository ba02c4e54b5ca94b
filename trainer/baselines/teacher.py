"""The multi-task ranking teacher the distillation baselines (DTML, DMMP) learn from.

A pointwise model over (user, item) pairs, trained on the train split's exposures — the entire
space, as ESMM (Ma et al., SIGIR 2018) does: the user's and the item's embeddings (the same
feature tables as CSMF's towers, user history before the event) are concatenated and fed to
experts; per task a gate mixes them (customised gate control, CGC: Tang et al., RecSys 2020, the
"task-shared and task-specific expert networks" of DMMP) and a head gives a logit. Two tasks:
pCTR = σ(click logit) on every exposure and pCVR = σ(conversion logit) on the clicked ones only
through pCTCVR = pCTR·pCVR, the entire-space product that DMTL uses for duration-after-click and
DMMP for conversion-after-click. Loss: BCE(pCTR, clicked) + BCE(pCTCVR, converted).

With ``shared=1, specific=0`` the teacher is a shared-bottom MTL network (DTML's); DMMP uses
shared + task-specific experts. After training the teacher is frozen; the students read its
value of every train exposure (:func:`trainer.baselines.joint.distilled_exposures`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csmf.towers import Batch, ModelConfig, Tower
from trainer.baselines.joint import Exposures, pair_batches, train_exposures
from trainer.config import RunConfig
from trainer.encoding import Encoded

TASKS = ("click", "conversion")
TEACHER_HIDDEN = 64  # expert width; every expert is in → 64 → 64 (ReLU)


def embedding_only(tower: Tower) -> Tower:
    """A :class:`Tower` reduced to its feature tables (``.embed``): the width of its output."""
    tower.layers = nn.ModuleList()
    return tower


def embed_width(tower: Tower) -> int:
    return sum(tower.table(n).weight.shape[1] for n in tower.inputs) + tower.num_numeric


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class Teacher(nn.Module):
    def __init__(
        self, cfg: ModelConfig, features, user_vocab, item_vocab, shared: int, specific: int
    ) -> None:
        super().__init__()
        its = item_vocab.sizes()
        self.user = embedding_only(
            Tower(features.user, user_vocab.sizes(), cfg, history_size=its["id"])
        )
        self.item = embedding_only(Tower(features.item, its, cfg))
        width = embed_width(self.user) + embed_width(self.item)
        h = TEACHER_HIDDEN
        self.shared = nn.ModuleList(mlp([width, h, h]) for _ in range(shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(mlp([width, h, h]) for _ in range(specific)) for _ in TASKS
        )
        n_gate = shared + specific
        self.gates = nn.ModuleList(nn.Linear(width, n_gate) for _ in TASKS) if n_gate > 1 else None
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1)) for _ in TASKS
        )

    def logits(self, ub: Batch, ib: Batch) -> tuple[Tensor, Tensor]:
        """(click logit, conversion-given-click logit), each (B,)."""
        return self._heads(torch.cat([self.user.embed(ub), self.item.embed(ib)], dim=1))

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shared = [f(x) for f in self.shared]
        out = []
        for t in range(len(TASKS)):
            experts = torch.stack(shared + [f(x) for f in self.specific[t]], dim=1)  # (B, K, h)
            if self.gates is None:
                mixed = experts[:, 0]
            else:
                w = torch.softmax(self.gates[t](x), dim=1).unsqueeze(-1)
                mixed = (w * experts).sum(1)
            out.append(self.heads[t](mixed).squeeze(-1))
        return out[0], out[1]


def teacher_loss(model: Teacher, ub: Batch, ib: Batch, clicked: Tensor, converted: Tensor):
    ctr, cvr = model.logits(ub, ib)
    p_ctr = torch.sigmoid(ctr)
    p_ctcvr = (p_ctr * torch.sigmoid(cvr)).clamp(1e-7, 1 - 1e-7)
    return F.binary_cross_entropy_with_logits(ctr, clicked) + F.binary_cross_entropy(
        p_ctcvr, converted
    )


def train_teacher(
    cfg: RunConfig, enc: Encoded, shared: int, specific: int, ex: Exposures | None = None
) -> tuple[Teacher, list[float]]:
    """Fit the teacher on the train exposures for the exposure stage's budget (epochs, lr);
    returns it frozen (eval mode, no gradients) with its loss per epoch."""
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng([cfg.train.seed, 7])
    ex = ex or train_exposures(enc)
    model = Teacher(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab, shared, specific)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.stage_lr(0))
    bs = cfg.train.batch_size
    clicked = torch.as_tensor(ex.clicked, dtype=torch.float32)
    converted = torch.as_tensor(ex.converted, dtype=torch.float32)
    losses = []
    model.train()
    for _ in range(cfg.train.stage_epochs(0)):
        perm = rng.permutation(len(ex))
        total, steps = 0.0, 0
        for lo in range(0, len(perm), bs):
            idx = perm[lo : lo + bs]
            ub, ib = pair_batches(ex, idx, enc)
            loss = teacher_loss(model, ub, ib, clicked[idx], converted[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, losses
