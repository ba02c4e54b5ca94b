"""MVKE — Mixture of Virtual-Kernel Experts.

Paper: Xu, Zhao, Liu, Xiao, Zhang, Zhang, "Mixture of Virtual-Kernel Experts for Multi-Objective
User Profile Modeling", KDD 2022 (arXiv 2106.07356). The user tower has K virtual-kernel experts
(VKE): each owns a learnable virtual kernel that attends over the user's feature-field
embeddings and feeds an expert network, so each expert models one facet of the user. On the item
("tag") side, a virtual-kernel gate (VKG) per task attends from the item's embedding to the
kernels and mixes the experts' outputs: the user representation depends on the item and the task.
Tasks (click, conversion) share the kernels and have their own gates and item towers.

Here:

- the user's fields are CSMF's user-tower inputs (id, categorical, multi-hot, history pooled by
  the history table); every field embedding is projected to the kernel width (16) for the
  attention (softmax over fields of <κ_k, W_f x_f>/√16); VKE k's input is the attention-weighted
  concatenation of the raw field embeddings (plus numeric features), its network CSMF's tower
  MLP (``model.hidden`` → ``out_dim``);
- K = 2 kernels shared by the tasks (the paper's multi-action setting shares kernels among
  tasks; the count is ours); one item tower per task (CSMF's item tower); gate
  g_t(i) = softmax_k(<W_t v_t(i), κ_k>/√16);
- tasks: every objective of CSMF's cascade (exposure, click, conversion). The paper's tasks are
  CTR and CVR, learnt from impressions — the exposure space; in our retrieval setting that
  space is the exposure objective, so it is a task too, as it is for CSMF and MMoE (with click
  and conversion alone MVKE sees ~10x fewer positives: 35 steps on the synthetic set). Each
  task is trained by the sampled softmax of its CSMF stage (same positives, negatives, log-Q,
  temperature, history, epoch budget), jointly, one optimizer;
- score_t(u, i) = <Σ_k g_tk(i) E_k(u), v_t(i)> = <[E_1 | .. | E_K](u), [g_t1(i) v_t(i) | .. |
  g_tK(i) v_t(i)]>: an inner product, so it can be served from a vector index.

Served: the item vector of task t is K·``out_dim`` wide (the gate folded into it), and a
weighted multi-objective query with query-time weights needs every task's: one index of
T·K·``out_dim`` dims per item searched with [k_1·E | .. | k_T·E] — exact, 6x CSMF's width at
T = 3, K = 2. (Fixing the weights at index time would fold the tasks into one K·``out_dim``
vector; then changing a weight means re-indexing.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from csmf.towers import Batch, Tower
from trainer.baselines.joint import train_joint
from trainer.baselines.teacher import embedding_only
from trainer.config import RunConfig
from trainer.encoding import Encoded

KERNEL_DIM = 16
N_KERNELS = 2


class MVKEModel(nn.Module):
    def __init__(self, cfg: RunConfig, enc: Encoded, tasks: Sequence[str], n_kernels: int) -> None:
        super().__init__()
        its = enc.item_vocab.sizes()
        self.user_embed = embedding_only(
            Tower(cfg.features.user, enc.user_vocab.sizes(), cfg.model, its["id"])
        )
        u = self.user_embed
        dims = [u.table(n).weight.shape[1] for n in u.inputs]
        self.field_proj = nn.ModuleList(nn.Linear(d, KERNEL_DIM, bias=False) for d in dims)
        self.kernels = nn.Parameter(torch.randn(n_kernels, KERNEL_DIM) * 0.1)
        width = sum(dims) + u.num_numeric
        self.experts = nn.ModuleList()
        for _ in range(n_kernels):
            layers: list[nn.Module] = []
            w = width
            for h in cfg.model.hidden:
                layers += [nn.Linear(w, h), nn.ReLU()]
                w = h
            layers.append(nn.Linear(w, cfg.model.out_dim))
            self.experts.append(nn.Sequential(*layers))
        self.item_towers = nn.ModuleList(Tower(cfg.features.item, its, cfg.model) for _ in tasks)
        self.gate_proj = nn.ModuleList(
            nn.Linear(cfg.model.out_dim, KERNEL_DIM, bias=False) for _ in tasks
        )
        # cascade stage index → task index (batch_loss passes the stage)
        self.task_of = {cfg.objectives.index(o): t for t, o in enumerate(tasks)}
        self.tasks, self.n_kernels, self.out_dim = tuple(tasks), n_kernels, cfg.model.out_dim

    def kernel_outputs(self, batch: Batch) -> Tensor:
        """(B, K·D): [E_1 | .. | E_K], each VKE over its kernel's attention-weighted fields."""
        u = self.user_embed
        fields = [u.table(n)(batch[n]) for n in u.inputs]  # each (B, d_f)
        keys = torch.stack([p(f) for p, f in zip(self.field_proj, fields, strict=True)], 1)
        att = torch.softmax(keys @ self.kernels.T / math.sqrt(KERNEL_DIM), dim=1)  # (B, F, K)
        numeric = [batch["num"].to(fields[0].dtype)] if u.num_numeric else []
        outs = []
        for k, expert in enumerate(self.experts):
            x = torch.cat([f * att[:, j, k : k + 1] for j, f in enumerate(fields)] + numeric, 1)
            outs.append(expert(x))
        return torch.cat(outs, dim=1)

    def task_items(self, batch: Batch, t: int) -> Tensor:
        """(B, K·D): [g_t1 v_t | .. | g_tK v_t]."""
        v = self.item_towers[t](batch)  # (B, D)
        g = torch.softmax(self.gate_proj[t](v) @ self.kernels.T / math.sqrt(KERNEL_DIM), dim=1)
        return (g.unsqueeze(-1) * v.unsqueeze(1)).flatten(1)

    def user(self, batch: Batch, stage: int | None = None) -> Tensor:
        """The stage's task: (B, K·D); None: every task's copy, (B, T·K·D)."""
        e = self.kernel_outputs(batch)
        return e if stage is not None else e.repeat(1, len(self.tasks))

    def item(self, batch: Batch, stage: int | None = None) -> Tensor:
        if stage is not None:
            return self.task_items(batch, self.task_of[stage])
        return torch.cat([self.task_items(batch, t) for t in range(len(self.tasks))], dim=1)

    def task_scale(self, weights: Sequence[float]) -> Tensor:
        """(T·K·D,) query scale: weight w_t on task t's block (one-hot = that task's score)."""
        w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32)
        return torch.repeat_interleave(w, self.n_kernels * self.out_dim)


def train_mvke(
    cfg: RunConfig, enc: Encoded, tasks: Sequence[str] | None = None, n_kernels: int = N_KERNELS
) -> tuple[MVKEModel, dict]:
    tasks = cfg.objectives if tasks is None else tasks
    torch.manual_seed(cfg.train.seed)
    model = MVKEModel(cfg, enc, tasks, n_kernels)
    return model, {"loss": train_joint(model, cfg, enc, list(tasks))}
