"""CF baselines: same evaluation path as CSMF, hyper-parameters chosen on validation
only, models that are what their names say (EASE's closed form, cosine ItemKNN, implicit's ALS)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from trainer.cf_baselines import (
    cosine_similarity,
    ease_weights,
    fit_als,
    interactions,
    keep_top_k,
    run_cf,
    score,
    select,
    validation_set,
)
from trainer.encoding import user_items
from trainer.evaluate import evaluate_vectors

SMALL = {  # small grids keep the tests fast; the real ones are GRIDS
    "als": {"regularization": [0.1, 10.0], "alpha": [1.0, 10.0], "iterations": [10]},
    "ease": {"lambda": [1.0, 30.0, 1000.0]},
    "itemknn": {"k": [5, 0], "shrink": [0.0, 10.0]},
}


@pytest.fixture
def enc(tiny_enc):
    return tiny_enc


def direct_metrics(scores: np.ndarray, enc, rows, target: str, n: int) -> dict:
    """Recall@n / nDCG@n from a (U, N) score matrix with plain numpy/python, independently of
    trainer.evaluate: per user, drop train items, sort, count hits."""
    ev = enc.events
    train = {}
    for r in enc.split.train:
        train.setdefault(int(ev.user[r]), set()).add(int(ev.item[r]))
    truth = {}
    for r in rows:
        if ev.positive(target)[r]:
            truth.setdefault(int(ev.user[r]), set()).add(int(ev.item[r]))
    rec, ndcg = [], []
    for u, pos in truth.items():
        s = scores[u].astype(np.float64).copy()
        s[list(train.get(u, ()))] = -np.inf
        top = np.argsort(-s, kind="stable")[:n]
        gains = [1.0 / np.log2(k + 2) for k, i in enumerate(top) if int(i) in pos]
        ideal = sum(1.0 / np.log2(k + 2) for k in range(min(len(pos), n)))
        rec.append(sum(int(i) in pos for i in top) / len(pos))
        ndcg.append(sum(gains) / ideal)
    return {"recall": float(np.mean(rec)), "ndcg": float(np.mean(ndcg))}


@pytest.mark.parametrize("model", ["als", "ease"])
def test_vectors_give_the_same_metrics_through_evaluate_vectors_and_directly(model, enc):
    x = interactions(enc, "click")
    p = {"als": {"regularization": 1.0, "alpha": 3.0, "iterations": 10}, "ease": {"lambda": 30.0}}[
        model
    ]
    if model == "als":
        from implicit.cpu.als import AlternatingLeastSquares

        with threadpool_limits(1, "blas"):
            m = AlternatingLeastSquares(factors=16, iterations=10, regularization=1.0, alpha=3.0,
                                        random_state=0, num_threads=1)  # fmt: skip
            m.fit(x, show_progress=False)
        e, v = m.user_factors, m.item_factors
        scores = e.astype(np.float64) @ v.T.astype(np.float64)  # implicit's own factors
        sweeps, (ours, _), _ = next(fit_als(x, p, [10], 16, 0, 1))
        assert sweeps == 10
        np.testing.assert_array_equal(ours, e)  # our fit is implicit's
    else:
        xd = x.toarray().astype(np.float64)
        g = xd.T @ xd + 30.0 * np.eye(xd.shape[1])
        b = np.linalg.solve(g, xd.T @ xd)  # unconstrained ridge, then EASE's diagonal fix:
        pinv = np.linalg.inv(g)
        b -= pinv * (np.diag(b) / np.diag(pinv))[None, :]
        scores = xd @ b
        e, v = xd, ease_weights(x, 30.0).T
    ranker = {"m": ("scale", torch.ones(e.shape[1]))}
    got = evaluate_vectors(torch.as_tensor(e, dtype=torch.float32),
                           torch.as_tensor(v, dtype=torch.float32), ranker, enc, 10)  # fmt: skip
    for target in ("click", "conversion"):
        want = direct_metrics(scores, enc, enc.split.test, target, 10)
        assert got["metrics"][target]["m"] == pytest.approx(want, abs=1e-9), target
        assert 0.0 < want["recall"] < 1.0


def test_ease_is_the_constrained_least_squares_solution():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((50, 20)) < 0.3).astype(np.float32))
    lam = 5.0
    b = ease_weights(x, lam)
    xd = x.toarray().astype(np.float64)
    grad = (xd.T @ xd + lam * np.eye(20)) @ b - xd.T @ xd  # KKT: zero off the diagonal
    off = ~np.eye(20, dtype=bool)
    assert np.abs(np.diag(b)).max() == 0.0
    assert np.abs(grad[off]).max() < 1e-8
    assert np.abs(grad[~off]).max() > 1e-3  # the diagonal constraint is active


def test_itemknn_is_cosine_with_shrinkage_and_top_k_per_item():
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((40, 15)) < 0.4).astype(np.float32))
    xd = x.toarray().astype(np.float64)
    s = cosine_similarity(x, shrink=10.0)
    i, j = 2, 7
    want = xd[:, i] @ xd[:, j] / (np.linalg.norm(xd[:, i]) * np.linalg.norm(xd[:, j]) + 10.0)
    assert s[i, j] == pytest.approx(want) and s[i, i] == 0.0
    w = keep_top_k(s, 3)
    assert ((w != 0).sum(0) <= 3).all()
    for col in range(15):
        kept = np.flatnonzero(w[:, col])
        dropped = np.setdiff1d(np.arange(15), kept)
        assert s[kept, col].min() >= s[dropped, col].max() - 1e-12
    assert np.array_equal(keep_top_k(s, 0), s)


def test_selection_never_sees_test_rows(tiny_cfg, enc):
    """Corrupting every test event changes the test metrics but not one chosen value."""
    bad = copy.deepcopy(enc)
    rng = np.random.default_rng(3)
    t = bad.split.test
    bad.events.item[t] = rng.integers(0, bad.n_items, len(t))
    bad.events.clicked[t] = rng.random(len(t)) < 0.5
    bad.events.converted[t] = bad.events.clicked[t] & (rng.random(len(t)) < 0.5)
    for model, grid in SMALL.items():
        x = interactions(enc, "click")
        assert (x != interactions(bad, "click")).nnz == 0  # fit input: train rows only
        a = select(model, x, validation_set(enc, 10), 16, 0, 1, grid)
        b = select(model, x, validation_set(bad, 10), 16, 0, 1, grid)
        assert a["params"] == b["params"] and a["grid"] == b["grid"], model
        assert a["criterion"] == max(r["criterion"] for r in a["grid"])
    run = run_cf("ease-click", enc, 10, 16, 0, 1)
    run_bad = run_cf("ease-click", bad, 10, 16, 0, 1)
    assert run.tuning["params"] == run_bad.tuning["params"]
    ranker = {"m": ("scale", torch.ones(run.e.shape[1]))}
    e, v = torch.from_numpy(run.e), torch.from_numpy(run.v)
    assert evaluate_vectors(e, v, ranker, enc, 10) != evaluate_vectors(e, v, ranker, bad, 10)


def test_validation_set_is_built_from_validation_and_train_rows_only(enc):
    val = validation_set(enc, 10)
    for target, mask in (("click", enc.events.clicked), ("conversion", enc.events.converted)):
        want = user_items(enc, enc.split.val, mask)
        assert val.truth[target].keys() == want.keys()
        assert all(np.array_equal(val.truth[target][u], want[u]) for u in want)
    train = user_items(enc, enc.split.train)
    assert val.exclude.keys() == train.keys()
    assert all(np.array_equal(val.exclude[u], train[u]) for u in train)


# What run_cf records of its choice (model, signal, parameters, grid, determinism) and its serving
# widths: tests/trainer/test_baselines.py::test_each_method_trains_and_evaluates, which runs every
# CF method through run_method (and so run_cf) once.


def test_als_sweep_path_equals_one_long_fit(enc):
    x = interactions(enc, "exposure")
    p = {"regularization": 1.0, "alpha": 3.0}
    path = list(fit_als(x, p, [3, 7], 16, 0, 1))
    (_, (e3, _), t3), (_, (e7, v7), t7) = path
    _, (e7_once, v7_once), _ = next(fit_als(x, p, [7], 16, 0, 1))
    np.testing.assert_allclose(e7, e7_once, atol=1e-5)
    np.testing.assert_allclose(v7, v7_once, atol=1e-5)
    assert not np.allclose(e3, e7) and t7 >= t3 > 0


def test_chosen_vectors_are_the_validated_model(enc):
    x = interactions(enc, "click")
    val = validation_set(enc, 10)
    chosen = select("itemknn", x, val, 16, 0, 1, SMALL["itemknn"])
    assert score(chosen["vectors"], val)["criterion"] == chosen["criterion"]
    assert chosen["fit_seconds"] > 0


def test_missing_library_is_a_clear_error(enc, monkeypatch):
    import sys

    from trainer.cf_baselines import MissingExtraError

    monkeypatch.setitem(sys.modules, "implicit", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"bench extra \(implicit is missing\)"):
        interactions(enc, "click")
