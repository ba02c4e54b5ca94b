"""A tiny dataset + a random-weight checkpoint with random unit owners, built once per session.

No trained model is needed to test the bundle: exactness and format properties hold for any
weights and any ownership. Features cover every kind (categorical, numeric, multi-hot, history).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from csmf.checkpoint import Checkpoint, new_model, save_checkpoint
from csmf.features import FeatureSpec, fit_tower_vocab
from csmf.towers import ModelConfig
from index_builder.build import build_bundle
from index_builder.config import BuildConfig

OBJECTIVES = ("exposure", "click", "conversion")
SPEC = {
    "user": {
        "id_column": "user_id",
        "id_dim": 8,
        "fields": [
            {"name": "gender", "kind": "categorical", "dim": 4},
            {"name": "age", "kind": "numeric"},
            {"name": "tags", "kind": "multi_hot", "dim": 4, "max_len": 3},
        ],
        "history": {"max_len": 6, "dim": 8, "source": "exposure"},
    },
    "item": {
        "id_column": "item_id",
        "id_dim": 8,
        "fields": [
            {"name": "genre", "kind": "categorical", "dim": 4},
            {"name": "genres", "kind": "multi_hot", "dim": 4, "max_len": 3},
            {"name": "price", "kind": "numeric"},
        ],
    },
    "display": ["title"],
}
SPLIT = {"val_frac": 0.1, "test_frac": 0.2, "min_events": 3}


def make_dataset(
    root: Path, n_users: int = 60, n_items: int = 1500, n_events: int = 1200, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    genres = ["action", "drama", "comedy", "horror", "docu"]
    tags = ["a", "b", "c", "d"]
    users = pa.table(
        {
            "user_id": [f"u{i}" for i in range(n_users)],
            "gender": rng.choice(["F", "M", None], n_users).tolist(),
            "age": [
                None if i % 11 == 0 else float(a)
                for i, a in enumerate(rng.integers(15, 70, n_users))
            ],
            "tags": [
                rng.choice(tags, rng.integers(0, 4), replace=False).tolist() for _ in range(n_users)
            ],
        }
    )
    items = pa.table(
        {
            "item_id": [f"i{j}" for j in range(n_items)],
            "genre": rng.choice(genres, n_items).tolist(),
            "genres": [
                rng.choice(genres, rng.integers(1, 3), replace=False).tolist()
                for _ in range(n_items)
            ],
            "price": rng.gamma(2.0, 10.0, n_items).tolist(),
            "title": [f"Item number {j}" for j in range(n_items)],
        }
    )
    clicked = rng.random(n_events) < 0.4
    events = pa.table(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, n_users, n_events)],
            "item_id": [f"i{j}" for j in rng.integers(0, n_items, n_events)],
            "timestamp": rng.integers(0, 50, n_events).astype(np.int64),  # many ties on purpose
            "clicked": clicked,
            "converted": clicked & (rng.random(n_events) < 0.3),
        }
    )
    for name, t in (("users", users), ("items", items), ("events", events)):
        pq.write_table(t, root / f"{name}.parquet")
    return root


def make_run(
    root: Path, dataset: Path, seed: int = 0, activation: str = "relu", out_dim: int = 12
) -> Path:
    """A checkpoint with random weights and random owners (every objective owns some outputs)."""
    torch.manual_seed(seed)
    spec = FeatureSpec.from_dict(SPEC)
    users = pq.read_table(dataset / "users.parquet").to_pydict()
    items = pq.read_table(dataset / "items.parquet").to_pydict()
    # Leave a few users/items out of the vocabularies: they must encode as UNK, not crash.
    uv = fit_tower_vocab(spec.user, {k: v[:-5] for k, v in users.items()})
    iv = fit_tower_vocab(spec.item, {k: v[:-20] for k, v in items.items()})
    cfg = ModelConfig(out_dim=out_dim, hidden=(16, 16), activation=activation, init_std=0.5)
    model = new_model(cfg, spec, uv, iv)
    with torch.no_grad():
        for g in model.unit_groups():
            g.owner.copy_(torch.randint(0, 3, g.owner.shape, dtype=torch.uint8))
        owners = torch.arange(out_dim) % 3  # every objective owns a slice ...
        model.output_owner.copy_(owners[torch.randperm(out_dim)].to(torch.uint8))  # ... interleaved
        for t in model.owned_modules():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # non-zero biases and padding rows too
    model.sync_owners()
    model.check_owners()
    ckpt = Checkpoint(
        model_config=cfg,
        features=spec,
        user_vocab=uv,
        item_vocab=iv,
        objectives=OBJECTIVES,
        state_dict=model.state_dict(),
        dataset=str(dataset),
        train_config={"split": SPLIT, "note": "random test model"},
        metrics={"note": "untrained"},
    )
    save_checkpoint(ckpt, root / "checkpoint.pt")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_dataset)


@pytest.fixture(scope="session")
def flat_bundle(tmp_path_factory, tiny_run) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "flat"
    build_bundle(tiny_run, out, BuildConfig(index="flat"), progress=False)
    return out
