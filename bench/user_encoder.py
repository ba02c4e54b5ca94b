"""User-encoder latency: numpy UserEncoder (serving) vs the torch user tower, ML-100K-shaped model
(configs/ml-100k.toml's features and model as shipped: 4 categorical user features, a 50-item
history, linear towers to 64 dims).

    .venv/bin/python bench/user_encoder.py

Reports the best of 7 repeats (the machine is shared; the minimum is the least disturbed run).
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from csmf.checkpoint import new_model
from csmf.features import FeatureSpec, fit_tower_vocab
from csmf.towers import ModelConfig
from index_builder.encode import output_permutation, user_encoder_from_model

ROOT = Path(__file__).resolve().parents[1]


def best_us(fn, n: int, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    cfg = tomllib.loads((ROOT / "configs/ml-100k.toml").read_text())
    spec = FeatureSpec.from_dict(cfg["features"])
    rng = np.random.default_rng(0)
    n_users, n_items = 943, 1682
    users = {
        "user_id": [str(i) for i in range(n_users)],
        "age_bucket": [str(a) for a in rng.integers(0, 7, n_users)],
        "gender": rng.choice(["M", "F"], n_users).tolist(),
        "occupation": [str(a) for a in rng.integers(0, 21, n_users)],
        "zip_prefix": [str(a) for a in rng.integers(0, 100, n_users)],
    }
    items = {
        "item_id": [str(i) for i in range(n_items)],
        "genres": [["a", "b"]] * n_items,
        "year_bucket": ["1990"] * n_items,
    }
    uv, iv = fit_tower_vocab(spec.user, users), fit_tower_vocab(spec.item, items)
    model_cfg = {
        k: v for k, v in cfg.get("model", {}).items() if k in ("out_dim", "hidden", "activation")
    }
    model = new_model(ModelConfig(**model_cfg), spec, uv, iv).eval()
    perm, _ = output_permutation(model.output_owner.numpy(), 3)
    enc = user_encoder_from_model(model.user, spec.user, uv, iv.ids, perm)

    row = {c: users[c][5] for c in users}
    hist = [str(i) for i in rng.integers(0, n_items, 50)]
    inputs = enc.encode_inputs([row], [hist])
    x = enc._first_input(row, hist)
    tin = {k: torch.from_numpy(v) for k, v in inputs.items()}
    rows, hists = [row] * 256, [hist] * 256
    with torch.inference_mode():
        torch_us = best_us(lambda: model.user(tin), 500)
        torch_batch = (
            best_us(
                lambda: model.user(
                    {k: torch.from_numpy(v) for k, v in enc.encode_inputs(rows, hists).items()}
                ),
                20,
            )
            / 256
        )
    print(f"numpy MLP only (3 layers), 1 user       {best_us(lambda: enc._mlp(x), 3000):7.1f} µs")
    print(
        f"numpy encode, 1 user (features+history)  {best_us(lambda: enc.encode([row], [hist]), 3000):7.1f} µs"
    )
    print(f"torch eager user tower forward, 1 user   {torch_us:7.1f} µs")
    print(
        f"numpy encode, batch of 256               {best_us(lambda: enc.encode(rows, hists), 20) / 256:7.1f} µs/user"
    )
    print(f"torch encode_rows+forward, batch of 256  {torch_batch:7.1f} µs/user")


if __name__ == "__main__":
    main()
