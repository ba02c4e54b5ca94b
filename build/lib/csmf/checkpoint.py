"""The trainer → index-builder file format: one ``checkpoint.pt`` in a run folder.

Holds the tower weights with their owner buffers, the model config, feature spec, vocabularies,
cascade objectives, the full training config and metrics. Everything but the state dict is plain
JSON-able data, so readers never unpickle arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csmf.errors import BundleError
from csmf.features import FeatureSpec, TowerVocab
from csmf.towers import ModelConfig, TwoTower

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    model_config: ModelConfig
    features: FeatureSpec
    user_vocab: TowerVocab
    item_vocab: TowerVocab
    objectives: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    dataset: str = ""  # path of the dataset folder the run trained on
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> TwoTower:
        """A TwoTower with this checkpoint's weights and owners, in eval mode."""
        model = new_model(self.model_config, self.features, self.user_vocab, self.item_vocab)
        model.load_state_dict(self.state_dict)
        model.sync_owners()
        model.check_owners()
        return model.eval()


def new_model(
    cfg: ModelConfig, features: FeatureSpec, user_vocab: TowerVocab, item_vocab: TowerVocab
) -> TwoTower:
    return TwoTower(cfg, features.user, features.item, user_vocab.sizes(), item_vocab.sizes())


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": ckpt.model_config.to_dict(),
        "features": ckpt.features.to_dict(),
        "user_vocab": ckpt.user_vocab.to_dict(),
        "item_vocab": ckpt.item_vocab.to_dict(),
        "objectives": list(ckpt.objectives),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "dataset": ckpt.dataset,
        "train_config": ckpt.train_config,
        "metrics": ckpt.metrics,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load ``path`` (a checkpoint file or a run folder containing checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise BundleError(f"no checkpoint at {path}; train one with `csmf train`")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise BundleError(f"cannot read checkpoint {path}: {exc}") from None
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise BundleError(
            f"checkpoint {path} has format {raw.get('format')!r}, this version reads {CHECKPOINT_FORMAT}"
        )
    return Checkpoint(
        model_config=ModelConfig(**raw["model_config"]),
        features=FeatureSpec.from_dict(_spec_dict(raw["features"])),
        user_vocab=TowerVocab.from_dict(raw["user_vocab"]),
        item_vocab=TowerVocab.from_dict(raw["item_vocab"]),
        objectives=tuple(raw["objectives"]),
        state_dict=raw["state_dict"],
        dataset=raw.get("dataset", ""),
        train_config=raw.get("train_config", {}),
        metrics=raw.get("metrics", {}),
    )


def _spec_dict(d: dict[str, Any]) -> dict[str, Any]:
    """asdict() output → the config-file shape FeatureSpec.from_dict accepts."""
    return {
        "user": {k: v for k, v in d["user"].items() if v is not None},
        "item": {k: v for k, v in d["item"].items() if v is not None},
        "display": d.get("display", ()),
    }
