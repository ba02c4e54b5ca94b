"""What may train at stage t, and proof afterwards that nothing else moved (docs/design.md#train).

Every trainable entry is decided in one place, :func:`mark_only_stage_trainable`, from the
modules' own ``trainable_mask(stage)``: an entry trains iff its unit is owned by ``stage`` (and,
for Linear weights, the connection is allowed). The returned :class:`StageParams` masks gradients
(so a *fresh* Adam never accumulates momentum on a frozen entry — Avalanche's PackNet warning:
momentum moves "frozen" weights unless their gradients are zero from the optimizer's first step),
applies weight decay only to trainable entries, and can copy frozen entries back.

Id tables train row-wise when ``TwoTower.use_sparse_gradients()`` is on (training at scale):
backward yields only the rows a batch looked up, the column mask is applied to those rows'
values, and SparseAdam updates those rows' parameters and moments only — untouched rows and their
optimizer state are untouched, so a step's cost does not grow with the table.

:class:`FrozenSnapshot` records every entry owned by an earlier stage (< t) and
:meth:`FrozenSnapshot.verify` raises :class:`OwnershipError` unless each is bit-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from csmf.errors import OwnershipError
from csmf.towers import OwnedEmbedding, OwnedLinear, TwoTower


def owned_parameters(model: TwoTower) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(qualified name, module, attribute, parameter) of every owned parameter."""
    for mod_name, module in model.named_modules():
        if isinstance(module, OwnedEmbedding | OwnedLinear):
            for attr, param in module.named_parameters(recurse=False):
                yield f"{mod_name}.{attr}", module, attr, param


def entry_owner(module: nn.Module, attr: str) -> Tensor:
    """Owner of every entry of ``module.<attr>``, shaped like it: an embedding column's entries
    belong to the column; a Linear weight row and bias belong to the output unit."""
    if isinstance(module, OwnedEmbedding):
        return module.owner.unsqueeze(0).expand_as(module.weight)
    if attr == "weight":
        return module.owner.unsqueeze(1).expand_as(module.weight)
    return module.owner


@dataclass
class StageParams:
    """The trainable slice of the model at one stage: parameters with their entry masks.

    ``masks[i]`` broadcasts to ``params[i]``: an id table's is a (1, D) column mask, so masking
    a row-sparse gradient touches only the rows the batch looked up (training at scale).
    """

    stage: int
    params: list[nn.Parameter]
    masks: list[Tensor]  # bool, broadcastable to the parameter; True = may change
    row_sparse: list[bool]  # the parameter's gradient is row-sparse (an id table)
    frozen_values: list[Tensor] | None = None  # clones at construction (``keep_values``)
    # per parameter, which rows may change: a bool (rows,) tensor, or None = every row (a warm
    # start training only the rows it grew, or only the items its new events name:
    # trainer/warm.py); None = every row of every parameter
    rows: list[Tensor | None] | None = None

    def mask_gradients(self, weight_decay: float = 0.0) -> None:
        """grad ← (grad + wd·p) ⊙ mask: frozen entries see exactly zero gradient. A row-sparse
        gradient is coalesced and masked in its values; its weight decay reaches only the rows
        the batch touched (lazy decay, as the row-wise optimizer's moments)."""
        rows = self.rows or [None] * len(self.params)
        for p, m, keep in zip(self.params, self.masks, rows, strict=True):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce()
                if keep is not None:  # rows that may not change leave the gradient altogether,
                    # so even carried moments do not step them (lazy Adam steps listed rows)
                    on = keep[g.indices()[0]]
                    g = torch.sparse_coo_tensor(
                        g.indices()[:, on],
                        g.values()[on],
                        g.shape,
                        is_coalesced=True,
                        check_invariants=False,
                    )
                values = g.values()  # (nnz, D), owned by the coalesced copy
                if weight_decay:
                    values.add_(p.detach()[g.indices()[0]], alpha=weight_decay)
                values.mul_(m)
                p.grad = g
                continue
            if weight_decay:
                g.add_(p.detach(), alpha=weight_decay)
            g.mul_(m)
            if keep is not None:
                g[~keep] = 0.0

    def restore_frozen(self) -> None:
        if self.frozen_values is None:
            raise OwnershipError("restore_frozen needs mark_only_stage_trainable(keep_values=True)")
        with torch.no_grad():
            for p, m, v in zip(self.params, self.masks, self.frozen_values, strict=True):
                p.copy_(torch.where(m, p, v))

    def optimizer(self, lr: float) -> StageOptimizer:
        """A fresh optimizer over these parameters only: Adam for dense gradients, SparseAdam
        (lazy Adam: moments and parameters of the rows a batch touched) for row-sparse ones. No
        weight decay inside the optimizers: decay is added to masked gradients instead, so it
        never reaches frozen entries."""
        sparse = [p for p, s in zip(self.params, self.row_sparse, strict=True) if s]
        dense = [p for p, s in zip(self.params, self.row_sparse, strict=True) if not s]
        return StageOptimizer(
            torch.optim.Adam(dense, lr=lr, weight_decay=0.0) if dense else None,
            torch.optim.SparseAdam(sparse, lr=lr) if sparse else None,
        )

    def count(self) -> int:
        """Trainable entries."""
        rows = self.rows or [None] * len(self.params)
        # a table's (1, D) mask counts columns, each p.numel() // m.numel() = rows long, of which
        # only the ``keep`` rows train; other masks are whole-shaped (keep = None)
        pairs = zip(self.params, self.masks, rows, strict=True)
        return sum(
            int(m.sum()) * (p.numel() // m.numel() if keep is None else int(keep.sum()))
            for p, m, keep in pairs
        )


class StageOptimizer:
    """Adam over the dense parameters and SparseAdam over the row-sparse id tables, stepped as
    one optimizer (``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``).

    Frozen columns of a table stay bit-identical under SparseAdam: their gradient values are 0
    from the optimizer's first step, so both moments stay 0 and every update is -0.0.
    """

    def __init__(
        self, dense: torch.optim.Optimizer | None, sparse: torch.optim.Optimizer | None
    ) -> None:
        self.dense, self.sparse = dense, sparse

    def _parts(self) -> dict[str, torch.optim.Optimizer]:
        return {k: o for k, o in (("dense", self.dense), ("sparse", self.sparse)) if o is not None}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts().values():
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self._parts().values():
            o.step()

    def _owner(self, p: nn.Parameter) -> torch.optim.Optimizer | None:
        for o in self._parts().values():
            if any(q is p for group in o.param_groups for q in group["params"]):
                return o
        return None

    def holds(self, p: nn.Parameter) -> bool:
        """Whether ``p`` is one of the parameters this optimizer steps."""
        return self._owner(p) is not None

    def state_of(self, p: nn.Parameter) -> dict:
        """The moments and step count held for ``p`` ({} before its first step)."""
        o = self._owner(p)
        return {} if o is None else dict(o.state.get(p, {}))

    def set_state(self, p: nn.Parameter, step: float, moments: dict[str, Tensor]) -> None:
        """Give ``p`` moments and a step count before the first step (trainer/moments.py):
        Adam keeps its step as a float tensor, SparseAdam as an int."""
        o = self._owner(p)
        if o is None:
            raise OwnershipError("set_state: the parameter is not in this optimizer")
        count = int(step)
        o.state[p] = {
            "step": torch.tensor(float(count)) if o is self.dense else count,
            **moments,
        }

    def state_dict(self) -> dict:
        return {
            "layout": sorted(self._parts()),
            **{k: o.state_dict() for k, o in self._parts().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        layout = state.get("layout") if isinstance(state, dict) else None
        if layout != sorted(self._parts()):
            raise OwnershipError(
                f"optimizer state of another layout: saved {layout or 'a single optimizer'}, "
                f"this run has {sorted(self._parts())} (id tables row-wise vs dense?)"
            )
        for k, o in self._parts().items():
            o.load_state_dict(state[k])


def mark_only_stage_trainable(
    model: TwoTower, stage: int, keep_values: bool = False
) -> StageParams:
    """Set ``requires_grad`` so that only parameters with entries owned by ``stage`` train, and
    return those parameters with their masks. Call again after owners change (CPP).
    ``keep_values``: clone the parameters for :meth:`StageParams.restore_frozen` (a copy of every
    trainable table: off by default)."""
    params, masks, sparse, values = [], [], [], []
    for _, module, attr, p in owned_parameters(model):
        mask = module.trainable_mask(stage)[attr].clone()
        trainable = bool(mask.any())
        p.requires_grad_(trainable)
        p.grad = None
        if trainable:
            params.append(p)
            masks.append(mask)
            sparse.append(isinstance(module, OwnedEmbedding) and module.sparse_grad)
            if keep_values:
                values.append(p.detach().clone())
    return StageParams(stage, params, masks, sparse, values if keep_values else None)


def unfreeze_all(model: TwoTower) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None


DIGEST_ABOVE = 1 << 22  # frozen entries of one parameter kept as values up to this count
DIGEST_ROWS = 1 << 16  # rows hashed at a time above it


def _frozen(owner: Tensor, stage: int, others: bool) -> Tensor:
    """Which owners are frozen while ``stage`` trains: the earlier stages' (the cascade), or
    every other stage's (a warm start fine-tunes stage by stage after the cascade ended)."""
    return owner != stage if others else owner < stage


def frozen_entries(
    module: nn.Module, attr: str, p: Tensor, stage: int, others: bool = False
) -> Iterator[Tensor]:
    """The entries of ``p`` owned by a stage < ``stage`` (``others``: by any stage but
    ``stage``), in row chunks for an id table (its frozen entries are whole columns: no (rows, D)
    mask, no copy of the table), else at once."""
    if isinstance(module, OwnedEmbedding):
        cols = torch.nonzero(_frozen(module.owner, stage, others)).squeeze(1)
        if len(cols) == 0:
            return
        w = p.detach()
        for lo in range(0, w.shape[0], DIGEST_ROWS):
            yield w[lo : lo + DIGEST_ROWS].index_select(1, cols)
        return
    frozen = _frozen(entry_owner(module, attr), stage, others)
    if frozen.any():
        yield p.detach()[frozen]


@dataclass
class FrozenSnapshot:
    """Every entry owned by an objective before ``stage``, to prove it never changes.

    Parameters with at most :data:`DIGEST_ABOVE` frozen entries keep their values (verify is a
    ``torch.equal``); larger ones (id tables of millions of rows) keep a SHA-256 per chunk of
    :data:`DIGEST_ROWS` rows of their frozen columns, so the snapshot costs no table copy and a
    changed entry still fails verification, naming its row range.
    """

    stage: int
    entries: dict[str, Tensor | list[str]]  # name → frozen values, or per-chunk digests
    others: bool = False  # every entry not owned by ``stage`` (warm start), not only earlier ones

    @classmethod
    def take(cls, model: TwoTower, stage: int, others: bool = False) -> FrozenSnapshot:
        entries: dict[str, Tensor | list[str]] = {}
        for name, module, attr, p in owned_parameters(model):
            n_frozen = _count_frozen(module, attr, stage, others)
            if n_frozen == 0:
                continue
            chunks = frozen_entries(module, attr, p, stage, others)
            if n_frozen <= DIGEST_ABOVE:
                entries[name] = torch.cat([c.reshape(-1) for c in chunks]).clone()
            else:
                entries[name] = [_digest(c) for c in chunks]
        return cls(stage, entries, others)

    def verify(self, model: TwoTower) -> None:
        """Raise OwnershipError naming every parameter whose frozen entries moved."""
        params = {name: (module, attr, p) for name, module, attr, p in owned_parameters(model)}
        moved = []
        for name, before in self.entries.items():
            module, attr, p = params[name]
            chunks = frozen_entries(module, attr, p, self.stage, self.others)
            if isinstance(before, Tensor):
                now = torch.cat([c.reshape(-1) for c in chunks])
                if not torch.equal(now, before):
                    n = int((now != before).sum()) if now.shape == before.shape else now.numel()
                    moved.append(f"{name} ({n} of {before.numel()} frozen entries)")
                continue
            bad = [i for i, c in enumerate(chunks) if i >= len(before) or _digest(c) != before[i]]
            if bad:
                rows = f"rows {bad[0] * DIGEST_ROWS}-{(bad[0] + 1) * DIGEST_ROWS - 1}"
                moved.append(f"{name} ({len(bad)} of {len(before)} row chunks, first {rows})")
        if moved:
            whose = "other stages" if self.others else "earlier stages"
            raise OwnershipError(
                f"stage {self.stage} changed parameters owned by {whose}: {', '.join(moved)}"
            )


def _count_frozen(module: nn.Module, attr: str, stage: int, others: bool = False) -> int:
    if isinstance(module, OwnedEmbedding):
        return int(_frozen(module.owner, stage, others).sum()) * module.weight.shape[0]
    return int(_frozen(entry_owner(module, attr), stage, others).sum())


def _digest(x: Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
