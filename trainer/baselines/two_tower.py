"""The plain two tower the single-vector baselines (DTML's student, MOPPR) train: CSMF's own
towers (:class:`csmf.towers.Tower`, ``model.hidden`` → ``model.out_dim``, no owners used)."""

from __future__ import annotations

from torch import Tensor, nn

from csmf.towers import Batch, Tower
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
