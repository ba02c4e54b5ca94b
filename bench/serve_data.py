"""A synthetic catalogue and a random-weight CSMF model, published as a bundle for bench/serve.py.

The serving cost depends on the model's shapes, not on what it learned, so the bench uses
``ModelConfig``'s default architecture (64 output dims, hidden 256-128, history of 50 items) with
random weights and owners, and a real FAISS index over N items built and recall-checked (on weighted
queries, floor 0.97) by the real index builder. Cached under ``.cache/bench/serve-<N>``.

ANN recall, unlike cost, does depend on the geometry of the item vectors. An untrained tower
spreads items like isotropic noise, on which no index reaches useful recall (measured: IVF
nprobe=32 recall@50 0.24-0.48 at 100k), while trained catalogues cluster by what items are about.
So the item tower here is made to cluster: items have a topic (1,000 topics), the per-item id
embedding is shrunk, and the hidden layers run in their linear range (large biases), giving a
mixture of topic clusters — recall@50 >= 0.99 at nprobe=32 on 100k items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from csmf.checkpoint import Checkpoint, new_model, save_checkpoint
from csmf.features import FeatureSpec, fit_tower_vocab
from csmf.towers import ModelConfig

OBJECTIVES = ("exposure", "click", "conversion")
SPEC = {
    "user": {
        "id_column": "user_id",
        "id_dim": 32,
        "fields": [
            {"name": "segment", "kind": "categorical", "dim": 8},
            {"name": "region", "kind": "categorical", "dim": 8},
            {"name": "age", "kind": "numeric"},
        ],
        "history": {"max_len": 50, "dim": 32, "source": "exposure"},
    },
    "item": {
        "id_column": "item_id",
        "id_dim": 32,
        "fields": [
            {"name": "topic", "kind": "categorical", "dim": 16},
        ],
    },
    "display": ["title"],
}


def make_dataset(
    root: Path, n_items: int, n_users: int, events_per_user: int, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "user_id": [f"u{i}" for i in range(n_users)],
                "segment": rng.integers(0, 8, n_users).astype(str).tolist(),
                "region": rng.integers(0, 12, n_users).astype(str).tolist(),
                "age": rng.integers(15, 80, n_users).astype(float),
            }
        ),
        root / "users.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item_id": [f"i{j}" for j in range(n_items)],
                "topic": rng.integers(0, 1000, n_items).astype(str).tolist(),
                "title": [f"Item {j}" for j in range(n_items)],
            }
        ),
        root / "items.parquet",
    )
    n_events = n_users * events_per_user
    popular = np.minimum(rng.zipf(1.3, n_events), n_items) - 1  # a long tail, like real logs
    items = np.where(rng.random(n_events) < 0.5, popular, rng.integers(0, n_items, n_events))
    clicked = rng.random(n_events) < 0.1
    pq.write_table(
        pa.table(
            {
                "user_id": [f"u{u}" for u in np.repeat(np.arange(n_users), events_per_user)],
                "item_id": [f"i{j}" for j in items],
                "timestamp": rng.integers(0, 10**6, n_events),
                "clicked": clicked,
                "converted": clicked & (rng.random(n_events) < 0.1),
            }
        ),
        root / "events.parquet",
    )
    return root


def make_run(root: Path, dataset: Path, seed: int = 0, id_scale: float = 0.3) -> Path:
    torch.manual_seed(seed)
    spec = FeatureSpec.from_dict(SPEC)
    uv = fit_tower_vocab(spec.user, pq.read_table(dataset / "users.parquet").to_pydict())
    iv = fit_tower_vocab(spec.item, pq.read_table(dataset / "items.parquet").to_pydict())
    cfg = ModelConfig(out_dim=64, hidden=(256, 128), activation="relu", init_std=0.3)
    model = new_model(cfg, spec, uv, iv)
    with torch.no_grad():
        owners = torch.tensor([0] * 16 + [1] * 24 + [2] * 24, dtype=torch.uint8)
        model.output_owner.copy_(owners[torch.randperm(64)])
        # Trained towers cluster items by what they are about; an untrained one spreads them
        # like isotropic noise, on which no ANN index has useful recall. Shrink the per-item id
        # embedding so items sit around their topic, as a trained catalogue would.
        model.item.table("id").weight.mul_(id_scale)
        model.item.table("cat:topic").weight.mul_(3.0)
        # Hidden biases well above zero keep the item tower's ReLUs in their linear range, so
        # item vectors are a linear image of (topic, id) embeddings: a Gaussian mixture.
        for layer in model.item.layers[:-1]:
            layer.bias.fill_(5.0)
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
        train_config={"note": "random bench model"},
    )
    save_checkpoint(ckpt, root / "checkpoint.pt")
    return root


def bench_bundle(
    n_items: int,
    cache: Path,
    index: str = "ivf",
    nprobe: int = 32,
    n_users: int = 20_000,
    tune: bool = False,
    onnx: bool = False,
) -> Path:
    """The bundle for ``n_items`` (built once, then reused). ``tune``: the builder lowers nprobe
    to the smallest value reaching recall 0.975 (floor 0.97 + margin 0.005) on held-out users;
    ``onnx``: the bundle also holds the user tower as ONNX (build-index --onnx)."""
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    root = cache / f"serve-{n_items}"
    out = root / f"bundle-{index}-{nprobe}{'-tuned' if tune else ''}{'-onnx' if onnx else ''}"
    if (out / "manifest.json").exists():
        return out
    ds = root / "data"
    if not (ds / "events.parquet").exists():
        make_dataset(ds, n_items, n_users, events_per_user=40)
    run = root / "run"
    if not (run / "checkpoint.pt").exists():
        make_run(run, ds)
    cfg = BuildConfig(
        index=index, nprobe=nprobe, recall_floor=0.97, recall_queries=500, tune=tune,
        tune_margin=0.005, onnx=onnx,
    )  # fmt: skip
    build_bundle(run, out, cfg, progress=False)
    return out


def bench_bundle_in(tree: Path, n_items: int, cache: Path, nprobe: int, tune: bool) -> Path:
    """:func:`bench_bundle` built by the source tree ``tree`` (its own bench/serve_data.py and
    builder, in a subprocess): an older commit may not read what this tree's builder writes, so
    a before/after run serves a bundle the older code built (same data, seeds and model)."""
    import os
    import subprocess
    import sys

    code = (
        "from pathlib import Path\nfrom serve_data import bench_bundle\n"
        f"print(bench_bundle({n_items}, Path({str(cache)!r}), nprobe={nprobe}, tune={tune}))"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree / "bench", env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"building the bundle in {tree} failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])
