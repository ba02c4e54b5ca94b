"""Data-parallel training under ``torchrun`` (DESIGN §7, §12): process-group setup, sharding of a
stage's examples, gradient and CPP-importance averaging, and rank-consistency checks.

The stage loop (:func:`trainer.cascade.run_cascade`) stays one loop; it asks a :class:`Dist`:

- ``shard(batch)``: each global step draws one global batch of ``batch_size × world`` examples from
  a permutation every rank draws identically (same seed); rank r trains on every world-th of them,
  so a rank's batch has ``batch_size`` rows and its in-batch negatives are its own rows (per-rank
  in-batch negatives; ``loss.negatives = "catalogue"`` is an exact softmax over every item, so it
  is rank-local and exact). Log-Q uses the stage's global item frequencies, identical everywhere.
- ``average_gradients(params)``: one flat all-reduce of the trainable parameters' gradients
  (mean over ranks) after backward, before the ownership masks — what DDP's reducer does. The
  cascade calls ``model.user``/``model.item`` rather than ``forward`` and changes the trainable set
  at every stage and after CPP, so the collective is issued here rather than through a
  ``DistributedDataParallel`` wrapper that registers one parameter set at construction.
- ``mean(tensor)``: CPP importances are averaged before pruning, so every rank frees the same units.
- ``check_consistent(model, stage, what)``: a SHA-256 of every owner buffer and every entry owned
  by stages <= ``stage``, all-gathered; any difference is a hard :class:`RankMismatchError`.

With one process :data:`SINGLE` makes all of these no-ops, so single-process training is unchanged.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor

from csmf.errors import CsmfError
from csmf.towers import TwoTower


class RankMismatchError(CsmfError, RuntimeError):
    """Ranks disagree on a global cascade decision (owners or frozen parameters)."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: CUDA)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch."""
        return idx[self.rank :: self.world] if self.active else idx

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        td.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def mean(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        x = x.detach().clone()
        td.all_reduce(x)
        return x / self.world

    def sum_floats(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, obj: object) -> list[object]:
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def check_consistent(self, model: TwoTower, stage: int, what: str) -> list[str]:
        """Hard error unless every rank holds the same owners and entries owned by stages
        <= ``stage``; returns every rank's digest (rank order)."""
        digests = [str(d) for d in self.gather_objects(model_digest(model, stage))]
        if len(set(digests)) != 1:
            per_rank = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            raise RankMismatchError(
                f"{what}: ranks disagree on owners / parameters owned by stages <= {stage} "
                f"({per_rank})"
            )
        return digests


def model_digest(model: TwoTower, stage: int) -> str:
    """SHA-256 over every owner buffer and every parameter entry owned by a stage <= ``stage``."""
    from trainer.ownership import entry_owner, owned_parameters

    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers()):
        if name.endswith("owner"):
            h.update(name.encode())
            h.update(buf.detach().cpu().numpy().tobytes())
    for name, module, attr, p in owned_parameters(model):
        mask = entry_owner(module, attr) <= stage
        h.update(name.encode())
        h.update(p.detach()[mask].cpu().numpy().tobytes())
    return h.hexdigest()


def init_from_env(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), else a single process.
    gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend=backend)
    return Dist(rank=td.get_rank(), world=td.get_world_size(), device=device)


def shutdown(dist: Dist) -> None:
    if dist.active and td.is_initialized():
        td.destroy_process_group()


SINGLE = Dist()
