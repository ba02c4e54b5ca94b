"""Data-parallel training under ``torchrun`` (docs/design.md#training-at-scale): process-group
setup, sharding of a stage's examples, gradient and CPP-importance averaging, and rank-consistency
checks.

The stage loop (:func:`trainer.cascade.run_cascade`) stays one loop; it asks a :class:`Dist`:

- ``shard(batch)``: each global step draws one global batch of ``batch_size × world`` examples from
  a permutation every rank draws identically (same seed); rank r trains on every world-th of them,
  so a rank's batch has ``batch_size`` rows and its in-batch negatives are its own rows (per-rank
  in-batch negatives; ``loss.negatives = "catalogue"`` is an exact softmax over every item, so it
  is rank-local and exact). Log-Q uses the stage's global item frequencies, identical everywhere.
- ``average_gradients(params, row_sparse)``: the mean over ranks of the trainable parameters'
  gradients after backward, before the ownership masks. Dense parameters (the towers' layers):
  one flat all-reduce — what DDP's reducer does. Row-sparse id tables: the rows each rank touched
  are all-gathered (row indices + values, every table in one pair of collectives) and summed, so
  the traffic is proportional to the rows a step looked up, never to the table (a 10M × 64
  table all-reduced in full is 2.5 GB a step; 4,096 looked-up rows are 1 MB). Every rank holds
  the whole table (replicated, not sharded) and applies the same summed gradient, so a
  checkpoint is the same on any world size. The cascade calls ``model.user``/``model.item``
  rather than ``forward`` and changes the trainable set at every stage and after CPP, so the
  collectives are issued here rather than through a ``DistributedDataParallel`` wrapper that
  registers one parameter set at construction. ``traffic`` counts each rank's payload bytes.
- ``mean(tensor)``: CPP importances are averaged before pruning, so every rank frees the same units.
- ``check_consistent(model, stage, what)``: a SHA-256 of every owner buffer and every entry owned
  by stages <= ``stage``, all-gathered; any difference is a hard :class:`RankMismatchError`.

With one process :data:`SINGLE` makes all of these no-ops, so single-process training is unchanged.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor

from csmf.errors import CsmfError
from csmf.towers import TwoTower
from trainer.ownership import frozen_entries, owned_parameters


class RankMismatchError(CsmfError, RuntimeError):
    """Ranks disagree on a global cascade decision (owners or frozen parameters)."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: CUDA)
    # payload bytes this rank contributed to gradient collectives: {"dense", "tables", "steps"}
    traffic: dict = field(default_factory=lambda: {"dense": 0, "tables": 0, "steps": 0})

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch."""
        return idx[self.rank :: self.world] if self.active else idx

    def average_gradients(
        self, params: list[torch.nn.Parameter], row_sparse: list[bool] | None = None
    ) -> None:
        """Mean gradient over ranks; ``row_sparse[i]``: ``params[i]`` is an id table whose
        gradient is row-sparse (the same flags on every rank: they decide the collectives)."""
        if not self.active or not params:
            return
        row_sparse = row_sparse or [False] * len(params)
        dense = [p for p, s in zip(params, row_sparse, strict=True) if not s]
        tables = [p for p, s in zip(params, row_sparse, strict=True) if s]
        self.traffic["steps"] += 1
        if dense:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
            flat = torch.cat([g.reshape(-1) for g in grads])
            td.all_reduce(flat)
            flat /= self.world
            self.traffic["dense"] += flat.numel() * flat.element_size()
            offset = 0
            for p in dense:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        if tables:
            self._reduce_rows(tables)

    def _reduce_rows(self, tables: list[torch.nn.Parameter]) -> None:
        """All-gather every table's touched rows (indices, values) and sum them: (nnz_r, D)
        per rank in, (nnz, D) coalesced out."""
        rows, values = [], []
        for p in tables:
            if p.grad is None:  # no lookup on this rank this step: it sends no rows
                rows.append(torch.zeros(0, dtype=torch.int64, device=p.device))
                values.append(torch.zeros(0, dtype=p.dtype, device=p.device))
                continue
            g = p.grad.coalesce()
            rows.append(g.indices()[0])
            values.append(g.values().reshape(-1))
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=self.device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world)]
        td.all_gather(all_counts, counts)
        widths = [p.shape[1] for p in tables]
        n_rows = max(int(c.sum()) for c in all_counts)
        n_vals = max(int((c * torch.tensor(widths)).sum()) for c in all_counts)
        flat_rows = _pad(torch.cat(rows), n_rows)
        flat_vals = _pad(torch.cat(values), n_vals)
        got_rows = [torch.empty_like(flat_rows) for _ in range(self.world)]
        got_vals = [torch.empty_like(flat_vals) for _ in range(self.world)]
        td.all_gather(got_rows, flat_rows)
        td.all_gather(got_vals, flat_vals)
        self.traffic["tables"] += (
            flat_rows.numel() * flat_rows.element_size()
            + flat_vals.numel() * flat_vals.element_size()
        )
        parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in tables]
        for c, r_all, v_all in zip(all_counts, got_rows, got_vals, strict=True):
            r_off = v_off = 0
            for i, (n, w) in enumerate(zip(c.tolist(), widths, strict=True)):
                parts[i].append((r_all[r_off : r_off + n], v_all[v_off : v_off + n * w].view(n, w)))
                r_off, v_off = r_off + n, v_off + n * w
        for p, pieces in zip(tables, parts, strict=True):
            idx = torch.cat([r for r, _ in pieces]).unsqueeze(0)
            val = torch.cat([v for _, v in pieces]) / self.world
            p.grad = torch.sparse_coo_tensor(idx, val, p.shape).coalesce()

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


def _pad(x: Tensor, n: int) -> Tensor:
    """``x`` (m,) zero-padded to (n,): all_gather needs one size on every rank."""
    return torch.cat([x, x.new_zeros(n - len(x))]) if len(x) < n else x


def model_digest(model: TwoTower, stage: int) -> str:
    """SHA-256 over every owner buffer and every parameter entry owned by a stage <= ``stage``
    (id tables hashed in row chunks: no copy of a table)."""
    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers()):
        if name.endswith("owner"):
            h.update(name.encode())
            h.update(buf.detach().cpu().numpy().tobytes())
    for name, module, attr, p in owned_parameters(model):
        h.update(name.encode())
        for chunk in frozen_entries(module, attr, p, stage + 1):
            h.update(chunk.cpu().contiguous().numpy().tobytes())
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
