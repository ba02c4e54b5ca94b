"""What may train at stage t, and proof afterwards that nothing else moved (DESIGN §2, step 1).

Every trainable entry is decided in one place, :func:`mark_only_stage_trainable`, from the
modules' own ``trainable_mask(stage)``: an entry trains iff its unit is owned by ``stage`` (and,
for Linear weights, the connection is allowed). The returned :class:`StageParams` masks gradients
(so a *fresh* Adam never accumulates momentum on a frozen entry — Avalanche's PackNet warning:
momentum moves "frozen" weights unless their gradients are zero from the optimizer's first step),
applies weight decay only to trainable entries, and can copy frozen entries back.

:class:`FrozenSnapshot` records every entry owned by an earlier stage (< t) and
:meth:`FrozenSnapshot.verify` raises :class:`OwnershipError` unless each is bit-identical.
"""

from __future__ import annotations

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
    """The trainable slice of the model at one stage: parameters with their entry masks."""

    stage: int
    params: list[nn.Parameter]
    masks: list[Tensor]  # bool, same shape as the parameter; True = may change
    frozen_values: list[Tensor]  # clones of the parameters at construction

    def mask_gradients(self, weight_decay: float = 0.0) -> None:
        """grad ← (grad + wd·p) ⊙ mask: frozen entries see exactly zero gradient."""
        for p, m in zip(self.params, self.masks, strict=True):
            if p.grad is None:
                continue
            if weight_decay:
                p.grad.add_(p.detach(), alpha=weight_decay)
            p.grad.mul_(m)

    def restore_frozen(self) -> None:
        with torch.no_grad():
            for p, m, v in zip(self.params, self.masks, self.frozen_values, strict=True):
                p.copy_(torch.where(m, p, v))

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """A fresh Adam over these parameters only. No weight decay inside the optimizer: decay is
        added to masked gradients instead, so it never reaches frozen entries."""
        return torch.optim.Adam(self.params, lr=lr, weight_decay=0.0)

    def count(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))


def mark_only_stage_trainable(model: TwoTower, stage: int) -> StageParams:
    """Set ``requires_grad`` so that only parameters with entries owned by ``stage`` train, and
    return those parameters with their masks. Call again after owners change (CPP)."""
    params, masks, values = [], [], []
    for _, module, attr, p in owned_parameters(model):
        mask = module.trainable_mask(stage)[attr].clone()
        trainable = bool(mask.any())
        p.requires_grad_(trainable)
        p.grad = None
        if trainable:
            params.append(p)
            masks.append(mask)
            values.append(p.detach().clone())
    return StageParams(stage, params, masks, values)


def unfreeze_all(model: TwoTower) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None


@dataclass
class FrozenSnapshot:
    """Every entry owned by an objective before ``stage``, to prove it never changes."""

    stage: int
    entries: dict[str, tuple[Tensor, Tensor]]  # name → (mask of frozen entries, their values)

    @classmethod
    def take(cls, model: TwoTower, stage: int) -> FrozenSnapshot:
        entries = {}
        for name, module, attr, p in owned_parameters(model):
            frozen = entry_owner(module, attr) < stage
            if frozen.any():
                entries[name] = (frozen.clone(), p.detach()[frozen].clone())
        return cls(stage, entries)

    def verify(self, model: TwoTower) -> None:
        """Raise OwnershipError naming every parameter whose frozen entries moved."""
        params = {name: p for name, _, _, p in owned_parameters(model)}
        moved = []
        for name, (mask, values) in self.entries.items():
            now = params[name].detach()[mask]
            if not torch.equal(now, values):
                n = int((now != values).sum())
                moved.append(f"{name} ({n} of {values.numel()} frozen entries)")
        if moved:
            raise OwnershipError(
                f"stage {self.stage} changed parameters owned by earlier stages: {', '.join(moved)}"
            )
