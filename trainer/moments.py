"""Adam moments carried from a run to its warm start (docs/design.md#warm-start).

A stage's optimizer ends with per-entry moments: how large and how steady each entry's gradient
has been. A warm start that begins with a *fresh* Adam has none, and Adam's first steps are then
about ``lr`` per entry whatever the gradient's size: every item row a catalogue softmax touches
(every item, each step) moves by the same amount, whether the new events say much about it or
nothing. On ML-100K one fresh 3-epoch warm start moved the item rows by 13–22 % of their value;
a chain of daily warm starts compounds that. Carrying the moments continues the optimisation
where the run left it: an entry whose gradients were large moves as it did in training, one
whose gradient is small now moves little (9–14 % on the same update). It did not change quality
on the validation window (bench/results/continual-ml-100k-validation-4.md), so warm starts
carry them only with ``warm.moments = "carry"``.

:func:`capture` takes, after each stage, the moments of the entries that stage owns — an id
table's trainable columns only, so the file totals about two table-sized tensors however many
stages there are; :func:`restore` loads them into the next run's optimizer for the same stage,
rows grown since (new users and items) starting at zero as in a fresh optimizer. The moments live
in the run folder (``moments.pt``), never in the checkpoint or a bundle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from csmf.checkpoint import atomic_save, load_versioned
from csmf.errors import CsmfError
from csmf.towers import OwnedEmbedding, TwoTower
from trainer.ownership import StageOptimizer, owned_parameters

MOMENTS_NAME = "moments.pt"
MOMENTS_FORMAT = 1

# stage index (as str) → parameter name → {"step", "exp_avg", "exp_avg_sq", "cols"}
Moments = dict[str, dict[str, dict]]


class MomentsError(CsmfError, ValueError):
    """A moments file that cannot be read."""


def capture(model: TwoTower, stage: int, opt: StageOptimizer) -> dict[str, dict]:
    """Parameter name → the moments ``opt`` holds for it: an id table's only in the columns
    ``stage`` owns now (``cols``), other parameters whole (others' entries have 0 moments)."""
    out: dict[str, dict] = {}
    for name, module, _, p in owned_parameters(model):
        state = opt.state_of(p)
        if "exp_avg" not in state:
            continue
        rec: dict = {"step": float(state["step"]), "cols": None}
        if isinstance(module, OwnedEmbedding):
            cols = torch.nonzero(module.owner == stage).squeeze(1)
            rec["cols"] = cols.cpu()
            for k in ("exp_avg", "exp_avg_sq"):
                rec[k] = state[k].detach().index_select(1, cols).cpu()
        else:
            for k in ("exp_avg", "exp_avg_sq"):
                rec[k] = state[k].detach().clone().cpu()
        out[name] = rec
    return out


def restore(model: TwoTower, stage: int, opt: StageOptimizer, saved: dict[str, dict]) -> list[str]:
    """Load ``saved`` (:func:`capture`'s, for the same stage) into the fresh ``opt``, for every
    parameter it steps whose owned entries are those saved; returns the names restored. Rows a
    table grew since start with zero moments; a parameter whose shape or columns changed
    otherwise is skipped (it starts fresh)."""
    done = []
    for name, module, _, p in owned_parameters(model):
        rec = saved.get(name)
        if rec is None or not opt.holds(p):
            continue
        table = isinstance(module, OwnedEmbedding)
        if table:
            cols = torch.nonzero(module.owner == stage).squeeze(1)
            rows = rec["exp_avg"].shape[0]
            if rec["cols"] is None or not torch.equal(cols.cpu(), rec["cols"]) or rows > len(p):
                continue
        elif rec["cols"] is not None or rec["exp_avg"].shape != p.shape:
            continue
        state = {}
        for k in ("exp_avg", "exp_avg_sq"):
            value = torch.zeros_like(p, memory_format=torch.preserve_format)
            if table:
                value[:rows, cols] = rec[k].to(p.device, p.dtype)
            else:
                value.copy_(rec[k])
            state[k] = value
        opt.set_state(p, rec["step"], state)
        done.append(name)
    return done


def save(moments: Moments, run: Path) -> Path:
    """``run``/moments.pt, written atomically."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / MOMENTS_NAME
    atomic_save({"format": MOMENTS_FORMAT, "stages": moments}, path)
    return path


def load(run: Path) -> Moments:
    """The moments saved in run folder ``run``; empty if it has none (an older run)."""
    path = run / MOMENTS_NAME
    if not path.exists():
        return {}
    return load_versioned(path, MOMENTS_FORMAT, MomentsError, "moments ")["stages"]
