"""What the service serves is what offline evaluation ranks, on a trained model: for known users,
``POST /v1/retrieve`` (numpy user tower, FAISS, the user's stored history excluded) returns the top
of the evaluation's fused ranking (torch towers, train items excluded), with the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmf.checkpoint import load_checkpoint

K = 10


@pytest.fixture(scope="module")
def evaluated(trained_run):
    """(user ids, item ids, (U, D) user and (N, D) item outputs, model, train items per user)
    as trainer.evaluate computes them."""
    from trainer.config import RunConfig
    from trainer.encoding import user_items
    from trainer.evaluate import encode_all
    from trainer.pipeline import prepare

    ckpt = load_checkpoint(trained_run)
    cfg = RunConfig.from_dict(ckpt.train_config)
    enc = prepare(cfg, ckpt.dataset, (ckpt.user_vocab, ckpt.item_vocab))
    model = ckpt.build_model()
    e, v = encode_all(model, enc)
    seen = user_items(enc, enc.split.train)
    return enc.user_vocab.ids.values, enc.item_vocab.ids.values, e, v, model, seen


@pytest.mark.parametrize("weights", [(1.0, 1.8, 1.2), (0.0, 1.0, 0.0), (0.3, 2.0, 0.7)])
def test_served_top_k_is_the_evaluated_ranking(evaluated, trained_bundle, make_client, weights):
    from trainer.evaluate import fused_ranker

    user_ids, item_ids, e, v, model, seen = evaluated
    _, scale = fused_ranker(model, weights)
    scores = ((e * scale) @ v.T).double()  # (U, N), as rank_metrics scores them
    client = make_client(trained_bundle)
    for u in range(0, len(user_ids), 3):
        row = scores[u].clone()
        row[torch.as_tensor(seen.get(u, np.array([], dtype=np.int64)))] = float("-inf")
        best = torch.topk(row, K)
        r = client.post(
            "/v1/retrieve", json={"user_id": user_ids[u], "k": K, "weights": list(weights)}
        )
        assert r.status_code == 200, r.text
        served = r.json()["items"]
        assert not r.json()["cold_start"]
        got = np.array([it["score"] for it in served])
        np.testing.assert_allclose(got, best.values.numpy(), rtol=1e-4, atol=1e-5)
        # the same items, up to the order of equal scores
        for it in served:
            i = item_ids.index(it["item_id"])
            assert abs(float(row[i]) - it["score"]) <= 1e-4 * max(1.0, abs(it["score"])), it
