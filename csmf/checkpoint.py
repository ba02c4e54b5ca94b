"""The trainer → index-builder file format: one ``checkpoint.pt`` in a run folder.

Holds the tower weights with their owner buffers, the model config, feature spec, vocabularies,
cascade objectives, the full training config and metrics, and the run's *provenance*: a content
fingerprint of the dataset it trained on and hashes of its vocabularies, so the index builder can
refuse an item table or a dataset folder the model was not trained on. Everything but the state
dict is plain JSON-able data, so readers never unpickle arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csmf.atomic import atomic_write
from csmf.errors import BundleError
from csmf.features import FeatureSpec, TowerVocab
from csmf.towers import ModelConfig, TwoTower

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
# The files of a dataset folder that training reads (trainer/data/dataset.py); metadata such as
# dataset.json or a synthetic generator's truth.npz is not part of the fingerprint.
DATASET_FILES = ("events.parquet", "users.parquet", "items.parquet", "candidates.parquet")
DATASET_DIRS = ("events",)


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
    # dataset fingerprint + per-file hashes + vocabulary hashes (see training_provenance); empty
    # in checkpoints written before it existed
    provenance: dict[str, Any] = field(default_factory=dict)

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
        "provenance": ckpt.provenance,
    }
    return atomic_save(payload, path)


def atomic_save(payload: Any, path: str | Path) -> Path:
    """torch.save to ``path`` through a fsynced temporary file and a rename (readers see the old
    file or the new one, never half of one)."""
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_versioned(path: Path, fmt: int, error: type[Exception], what: str = "") -> dict:
    """``torch.load`` a dict written by :func:`atomic_save` and check its ``format``; a corrupt
    file or another format raises ``error`` naming ``what`` + the path."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise error(f"cannot read {what}{path}: {exc}") from None
    if raw.get("format") != fmt:
        raise error(f"{what}{path} has format {raw.get('format')!r}, this version reads {fmt}")
    return raw


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load ``path`` (a checkpoint file or a run folder containing checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise BundleError(f"no checkpoint at {path}; train one with `csmf train`")
    raw = load_versioned(path, CHECKPOINT_FORMAT, BundleError, "checkpoint ")
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
        provenance=raw.get("provenance", {}),
    )


def _spec_dict(d: dict[str, Any]) -> dict[str, Any]:
    """asdict() output → the config-file shape FeatureSpec.from_dict accepts."""
    return {
        "user": {k: v for k, v in d["user"].items() if v is not None},
        "item": {k: v for k, v in d["item"].items() if v is not None},
        "display": d.get("display", ()),
    }


# -- provenance ------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dataset_files(root: str | Path, extra: Sequence[str] = ()) -> dict[str, str]:
    """{relative path: sha256} of the files training reads from the dataset folder ``root``
    (plus the ``extra`` files present, e.g. the benchmark oracle's ``truth.npz``). Metadata
    (``dataset.json``, whose ``created_at`` changes on every conversion) is not content.
    Reading every byte once is cheap next to training on them (~1 GB/s)."""
    root = Path(root)
    paths = [root / n for n in (*DATASET_FILES, *extra) if (root / n).is_file()]
    for d in DATASET_DIRS:
        if (root / d).is_dir():
            paths += sorted(p for p in (root / d).rglob("*.parquet") if p.is_file())
    return {p.relative_to(root).as_posix(): _file_sha256(p) for p in sorted(paths)}


def dataset_fingerprint(files: dict[str, str]) -> str:
    """One id for a dataset's content: a hash of its files' names and hashes."""
    text = "".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vocab_hash(vocab: TowerVocab) -> str:
    """A hash of a tower's id vocabulary (the ids, in embedding-row order)."""
    return hashlib.sha256("\n".join(vocab.ids.values).encode()).hexdigest()[:16]


def training_provenance(
    dataset: str | Path, user_vocab: TowerVocab, item_vocab: TowerVocab
) -> dict:
    """What a checkpoint records about the data it was trained on (checked by the index builder)."""
    files = dataset_files(dataset)
    return {
        "dataset_fingerprint": dataset_fingerprint(files),
        "dataset_files": files,
        "item_vocab_hash": vocab_hash(item_vocab),
        "user_vocab_hash": vocab_hash(user_vocab),
        "items": item_vocab.ids.size,
        "users": user_vocab.ids.size,
    }
