"""Selective mask: free the least important units of stage t for stage t + 1
(docs/design.md#prune-cpp).

CPP — cumulative percentile-based pruning (paper §4.2). Per layer (every embedding table is its
own layer; the final layer spans both towers) and among the units owned by ``t``: importance of a
unit = L1 norm of its live incoming weights; sort ascending; with cumulative sums c_1..c_n, free
every unit with ``c_j <= tau * c_n``. Freed units become owned by ``t + 1``. Two ablations:
"fixed" ('w/o CPP', PackNet-style magnitude pruning) frees the ``round(tau * n)`` least important
units; "random" frees as many units as CPP would, chosen uniformly at random (is the *choice* by
importance worth anything beyond the budget?).

Guard rails per layer: at least ``min_keep`` units stay with ``t`` and at least ``min_free`` are
freed (``min_keep`` wins when a layer is too small for both).

After the owners change, ``sync_owners`` propagates them upward; connections from freed units into
units still owned by ``t`` become disallowed and are zeroed in storage too. Freed units either keep
their trained incoming weights (``warm``) or are re-initialised (``reinit``). Units the last
stage frees (``cascade.last_tau``) are zeroed instead (``zero``): unowned, they must not move any
vector until ``csmf extend`` gives them to a new objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from csmf.towers import OwnedEmbedding, OwnedLinear, TwoTower


def cpp_free_count(importance: Tensor, tau: float) -> int:
    """How many of the (ascending-sorted) units satisfy c_j <= tau * c_n."""
    if importance.numel() == 0:
        return 0
    c = torch.cumsum(torch.sort(importance.double()).values, 0)  # (n,)
    return int((c <= tau * c[-1]).sum())


def fixed_free_count(n: int, tau: float) -> int:
    return int(math.floor(tau * n + 0.5))


def select_freed(
    importance: Tensor,
    tau: float,
    method: str = "cpp",
    min_keep: int = 1,
    min_free: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bool mask (n,) of the units to free, among ``importance`` (n,) of one layer's units."""
    n = importance.numel()
    k = fixed_free_count(n, tau) if method == "fixed" else cpp_free_count(importance, tau)
    k = max(k, min_free)
    k = max(0, min(k, n - min_keep))
    freed = torch.zeros(n, dtype=torch.bool, device=importance.device)
    if k:
        if method == "random":  # CPP's budget, units drawn uniformly
            order = torch.randperm(n, generator=generator).to(importance.device)
        else:
            order = torch.sort(importance, stable=True).indices  # ascending; ties by position
        freed[order[:k]] = True
    return freed


def prune_stage(
    model: TwoTower,
    stage: int,
    tau: float,
    method: str = "cpp",
    min_keep: int = 1,
    min_free: int = 0,
    freed_init: str = "warm",
    generator: torch.Generator | None = None,
    reduce_importance: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, dict[str, int]]:
    """Apply CPP (or the fixed variant) to every unit group; return ``{group: {kept, freed}}``.

    Importances are all computed before any owner changes, so the order of groups does not matter.
    ``reduce_importance`` (data-parallel training: the mean over ranks) is applied to each
    group's importances first, so every rank frees the same units.
    """
    groups = model.unit_groups()
    plans = []
    for g in groups:
        mine = torch.nonzero(g.owner == stage).squeeze(1)  # (n,) units owned by this stage
        importance = g.importance()
        if reduce_importance is not None:
            importance = reduce_importance(importance)
        freed = select_freed(importance[mine], tau, method, min_keep, min_free, generator)
        plans.append((g, mine[freed]))
    sizes = {}
    for g, idx in plans:
        g.owner[idx] = stage + 1
        sizes[g.name] = {"kept": int((g.owner == stage).sum()), "freed": len(idx)}
    model.sync_owners()
    model.check_owners()
    for m in model.owned_modules():
        if isinstance(m, OwnedLinear):
            m.zero_disallowed()  # freed → kept connections no longer exist
    if freed_init == "reinit":
        reinit_units(model, stage + 1, generator)
    elif freed_init == "zero":  # the last stage's: unowned until an objective claims them
        zero_units(model, stage + 1)
    return sizes


def zero_units(model: TwoTower, owner: int) -> None:
    """Zero the incoming weights and biases of every unit owned by ``owner``: the units output
    exactly 0 whatever their inputs, so every vector is 0 in their output dims."""
    with torch.no_grad():
        for m in model.owned_modules():
            units = m.owner == owner
            if not units.any():
                continue
            if isinstance(m, OwnedEmbedding):
                m.weight[:, units] = 0.0
            else:
                m.weight[units] = 0.0
                m.bias[units] = 0.0


def reinit_units(model: TwoTower, owner: int, generator: torch.Generator | None = None) -> None:
    """Re-initialise the incoming weights (and biases) of every unit owned by ``owner``, as at
    construction: embedding columns ~ N(0, init_std), Linear rows ~ kaiming-uniform, bias 0."""
    std = model.cfg.init_std
    with torch.no_grad():
        for m in model.owned_modules():
            units = m.owner == owner
            if not units.any():
                continue
            if isinstance(m, OwnedEmbedding):
                fresh = (torch.randn(m.weight.shape, generator=generator) * std).to(m.weight.device)
                fresh[0] = 0.0  # padding row stays zero
                m.weight[:, units] = fresh[:, units]
            else:
                fresh = torch.empty(m.weight.shape)
                bound = 1.0 / math.sqrt(m.weight.shape[1])  # kaiming_uniform(a=sqrt(5)) bound
                fresh = fresh.uniform_(-bound, bound, generator=generator).to(m.weight.device)
                m.weight[units] = (fresh * m.connection_mask())[units]
                m.bias[units] = 0.0


def slice_sizes(model: TwoTower) -> dict[str, list[int]]:
    """Units per owner for every group: ``{group: [n_owned_by_0, n_owned_by_1, ...]}``."""
    t = model.cfg.num_objectives
    return {
        g.name: torch.bincount(g.owner.long(), minlength=t).tolist() for g in model.unit_groups()
    }
