"""Recall@N / nDCG@N by hand, exclusion of train items, and the popularity rankers."""

import math

import numpy as np
import torch

from trainer.evaluate import evaluate_model, rank_metrics


def test_rank_metrics_by_hand():
    # one user, 5 items; scores rank items 4,3,2,1,0; item 4 is a train item (excluded)
    e = torch.ones(1, 1)
    v = torch.arange(5, dtype=torch.float32).unsqueeze(1)
    truth = {0: np.array([3, 0])}
    exclude = {0: np.array([4])}
    out = rank_metrics(e, v, {"m": ("scale", torch.ones(1))}, truth, exclude, n=2)["m"]
    # top-2 after exclusion: 3 (hit), 2 (miss) → recall 1/2; dcg 1/log2(2) = 1; idcg 1 + 1/log2(3)
    assert math.isclose(out["recall"], 0.5)
    assert math.isclose(out["ndcg"], 1.0 / (1.0 + 1.0 / math.log2(3)))
    fixed = rank_metrics(
        e, v, {"p": ("fixed", torch.tensor([9.0, 0, 0, 0, 10]))}, truth, exclude, 1
    )
    assert math.isclose(fixed["p"]["recall"], 0.5) and math.isclose(fixed["p"]["ndcg"], 1.0)


def test_evaluate_model_table(trained):
    r = evaluate_model(trained.model, trained.enc, trained.cfg.objectives, (1, 1.8, 1.2), n=10)
    rankers = set(r["metrics"]["click"])
    assert {"exposure", "click", "conversion", "fused", "popularity (exposures)"} <= rankers
    for target in ("click", "conversion"):
        assert r["users"][target] > 0
        for m in r["metrics"][target].values():
            assert 0 <= m["recall"] <= 1 and 0 <= m["ndcg"] <= 1
    # the tiny data has strong topic structure: the trained click view beats random (10/60)
    assert r["metrics"]["click"]["click"]["recall"] > 0.3
