"""Collaborative-filtering baselines: the retrieval a team would pick instead of CSMF.

- ``als-click`` / ``als-exposure``: implicit-feedback matrix factorisation by alternating least
  squares (``implicit``; confidence 1 + alpha·r), ``model.out_dim`` factors = CSMF's served
  dimension, trained on the train split's clicks / exposures;
- ``bpr-click``: Bayesian personalised ranking (``implicit``), ``out_dim`` factors plus
  implicit's item-bias column (served dims = out_dim + 1);
- ``ease-click`` / ``ease-exposure``: EASE (Steck 2019), closed form
  B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹;
- ``itemknn-click`` / ``itemknn-exposure``: item-item cosine similarity with shrinkage, each
  item keeping its k most similar items;
- ``rp3beta-click`` / ``rp3beta-exposure``: RP3β (Paudel, Christoffel, Newell, Bernstein,
  "Updatable, Accurate, Diverse, and Scalable Recommendations for Interactive Applications",
  ACM TiiS 2017; the formulation of Dacrema et al.'s reproducibility study, RecSys 2019): the
  3-step random walk user → item → user → item with transition probabilities raised to α and
  the landing item's popularity divided out, W_ij = Σ_u P_iu^α P_uj^α / deg(j)^β
  (P_uj = X_uj / deg(u), P_iu = X_ui / deg(i)), each item i keeping its k largest W_ij
  (0 = all), score = X_u·W. Row normalisation of W (an option there) is not in the grid.

Every model is a (user vector, item vector) inner product, so all of them are scored by
:func:`trainer.evaluate.evaluate_vectors` — the protocol of CSMF — through a
``("scale", ones)`` ranker: for ALS/BPR the factor matrices; for EASE / ItemKNN the user vector is
the user's train interaction row X_u (``n_items`` dims) and the item vector is column i of the
item-item matrix (V = Bᵀ): serving them from a vector index costs ``n_items`` dims per item,
which is what the cost table reports.

Hyper-parameters are chosen on the **validation split only**: :func:`select` gets the fit input
(train rows) and a :class:`ValidationSet` (validation positives, train items to exclude) — never
the test rows. Criterion: mean over the click and conversion targets of (Recall@N + nDCG@N) / 2
on validation, the four numbers of the comparison table. Models are fitted on the train split,
as CSMF is (validation events are not added back), and the user's train interactions are its
history at test time, as CSMF's user tower sees them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import csmf.objectives as funnel
from csmf.errors import ConfigError
from trainer.encoding import Encoded, user_items
from trainer.evaluate import rank_metrics

# method → (model, training signal)
CF_METHODS: dict[str, tuple[str, str]] = {
    "als-click": ("als", "click"),
    "als-exposure": ("als", "exposure"),
    "bpr-click": ("bpr", "click"),
    "ease-click": ("ease", "click"),
    "ease-exposure": ("ease", "exposure"),
    "itemknn-click": ("itemknn", "click"),
    "itemknn-exposure": ("itemknn", "exposure"),
    "rp3beta-click": ("rp3beta", "click"),
    "rp3beta-exposure": ("rp3beta", "exposure"),
}
DETERMINISTIC = {"ease", "itemknn", "rp3beta"}  # same result for every seed

# The validation grids (changing them changes the bench cache key: it hashes this file).
# ALS: regularization from 0.1 to 300 and confidence scaling alpha from 0.3 to 100 (the usual
# implicit-feedback weighting, Hu et al. 2008), 15 to 100 sweeps. On ML-100K a first, coarser
# grid (regularization 0.01-100 in decades) put the optimum at 10 with a ridge along
# regularization ~ alpha (100/100 was nearly as good), hence the half-decade steps up to 300.
# BPR: learning rate, regularization, epochs a factor 3-10 either side of implicit's defaults
# (0.01, 0.01, 100); on ML-100K a first grid (lr 0.003-0.1, reg 1e-4-0.1, 30-300 epochs) chose
# its smallest lr and reg and most epochs, so the grid extends that way.
# EASE: lambda on a quarter-decade log grid from 1 to 1e5 (ML-100K's optimum is in the hundreds).
# ItemKNN: neighbourhood size from 5 to the whole catalogue (0 = all), shrinkage 0 to 200.
# RP3β: around Dacrema et al.'s ML optima (alpha ~0.5-1, beta ~0.2-0.4, k 50-300): alpha 0.25-1.5,
# beta 0-0.8, k 10 to the whole catalogue.
GRIDS: dict[str, dict[str, list]] = {
    "als": {
        "regularization": [0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
        "alpha": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
        "iterations": [15, 50, 100],
    },
    "bpr": {
        "learning_rate": [0.001, 0.003, 0.01, 0.03],
        "regularization": [0.0, 0.0001, 0.001, 0.01],
        "iterations": [100, 300, 1000],
    },
    "ease": {"lambda": [float(x) for x in np.round(np.logspace(0, 5, 21), 1)]},
    "itemknn": {
        "k": [5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 0],
        "shrink": [0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0],
    },
    "rp3beta": {
        "alpha": [0.25, 0.5, 0.75, 1.0, 1.5],
        "beta": [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8],
        "k": [10, 20, 50, 100, 200, 0],
    },
}
SELECTION_TARGETS = funnel.TARGETS
EASE_MAX_ITEMS = 30_000  # B is n_items² float64 (30k items ≈ 7 GB)

Vectors = tuple[np.ndarray, np.ndarray]  # (n_users, D), (n_items, D) float32

if TYPE_CHECKING:
    import scipy.sparse as sp


class MissingExtraError(ConfigError):
    """The CF baselines' libraries are not installed."""


def _sparse():
    try:
        import implicit  # noqa: F401
        import scipy.sparse
        import threadpoolctl  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"the CF baselines need the bench extra ({exc.name} is missing): "
            "pip install 'csmf-retrieval[bench]'"
        ) from None
    return scipy.sparse


def threadpool_limits(limits, user_api=None):
    from threadpoolctl import threadpool_limits as limit

    return limit(limits, user_api)


# --------------------------------------------------------------------------- data


def interactions(enc: Encoded, objective: str) -> sp.csr_matrix:
    """Binary (n_users, n_items) matrix of the train split's ``objective`` positives."""
    sp = _sparse()
    rows = enc.split.train
    rows = rows[enc.events.positive(objective)[rows]]
    x = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (enc.events.user[rows], enc.events.item[rows])),
        shape=(enc.n_users, enc.n_items),
    )
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


@dataclass(frozen=True)
class ValidationSet:
    """What hyper-parameter selection may see: validation positives per target and the train
    items each user has (excluded from the ranking, as in the test protocol)."""

    truth: Mapping[str, Mapping[int, np.ndarray]]  # target → user row → item rows
    exclude: Mapping[int, np.ndarray]
    n: int


def validation_set(enc: Encoded, n: int, targets=SELECTION_TARGETS) -> ValidationSet:
    """Built from ``enc.split.val`` and ``enc.split.train`` rows only."""
    return ValidationSet(
        truth={t: user_items(enc, enc.split.val, enc.events.positive(t)) for t in targets},
        exclude=user_items(enc, enc.split.train),
        n=n,
    )


def score(vectors: Vectors, val: ValidationSet) -> dict:
    """Validation metrics of (user, item) vectors and the selection criterion."""
    e, v = (torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32)) for a in vectors)
    ranker = {"m": ("scale", torch.ones(e.shape[1]))}
    metrics = {
        t: rank_metrics(e, v, ranker, truth, val.exclude, val.n)["m"]
        for t, truth in val.truth.items()
    }
    crit = float(np.mean([(m["recall"] + m["ndcg"]) / 2 for m in metrics.values()]))
    return {"metrics": metrics, "criterion": crit}


# --------------------------------------------------------------------------- models
#
# A fit walks one "path" hyper-parameter (PATH_KEY: ALS/BPR sweeps, ItemKNN's k) for fixed other
# values and yields (path value, vectors, seconds to build exactly that model) at each grid value
# of it: ALS continued from 15 to 50 sweeps is the 50-sweep model (its updates only read the
# current factors); BPR continued is the same number of SGD epochs from the same start; ItemKNN
# reuses one similarity matrix for every k.

Fit = Callable[..., Iterator[tuple[Any, Vectors, float]]]
PATH_KEY = {"als": "iterations", "bpr": "iterations", "ease": None, "itemknn": "k", "rp3beta": "k"}


def _implicit_path(
    model, x: sp.csr_matrix, sweeps: list[int]
) -> Iterator[tuple[int, Vectors, float]]:
    done, elapsed = 0, 0.0
    for total in sorted(sweeps):
        start = time.perf_counter()
        model.iterations = total - done
        with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, BLAS single
            model.fit(x, show_progress=False)
        elapsed += time.perf_counter() - start
        done = total
        yield total, (np.array(model.user_factors), np.array(model.item_factors)), elapsed


def fit_als(x, p: Mapping, sweeps: list[int], factors: int, seed: int, threads: int):
    from implicit.cpu.als import AlternatingLeastSquares

    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=p["regularization"],
            alpha=p["alpha"],
            random_state=seed,
            # 0 (torch's "one per core") → 1: implicit's OpenMP workers spin-wait; with another
            # job on a 2-core box, 2 threads ran ~30x slower than 1
            num_threads=threads or 1,
        )
    yield from _implicit_path(model, x, sweeps)


def fit_bpr(x, p: Mapping, sweeps: list[int], factors: int, seed: int, threads: int):
    """implicit's BPR: the last column is the item bias (user side fixed to 1); one thread
    (more is hogwild SGD: not reproducible)."""
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    with threadpool_limits(1, "blas"):
        model = BayesianPersonalizedRanking(
            factors=factors,
            learning_rate=p["learning_rate"],
            regularization=p["regularization"],
            random_state=seed,
            num_threads=1,
        )
    yield from _implicit_path(model, x, sweeps)


def ease_weights(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """(N, N) EASE item-item matrix B with a zero diagonal: scores = X·B."""
    if x.shape[1] > EASE_MAX_ITEMS:
        raise ConfigError(
            f"EASE inverts an n_items x n_items matrix; {x.shape[1]:,} items exceeds the "
            f"{EASE_MAX_ITEMS:,} this benchmark allows"
        )
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


def fit_ease(x, p: Mapping, path: list, factors: int, seed: int, threads: int):
    start = time.perf_counter()
    b = ease_weights(x, p["lambda"])
    vectors = (x.toarray(), b.T.astype(np.float32))
    yield None, vectors, time.perf_counter() - start


def cosine_similarity(x: sp.csr_matrix, shrink: float) -> np.ndarray:
    """(N, N) item-item cosine over users, s_ij = x_i·x_j / (|x_i||x_j| + shrink), zero diagonal."""
    co = (x.T @ x).toarray().astype(np.float64)
    norm = np.sqrt(np.diag(co))
    s = co / (norm[:, None] * norm[None, :] + shrink + 1e-12)
    s[np.diag_indices_from(s)] = 0.0
    return s


def keep_top_k(s: np.ndarray, k: int) -> np.ndarray:
    """Keep, in every column i (the target item), its k largest similarities; 0 = keep all."""
    if k <= 0 or k >= s.shape[0] - 1:
        return s
    cut = np.argpartition(-s, k, axis=0)[k:]  # (N - k, N) rows to drop per column
    out = s.copy()
    np.put_along_axis(out, cut, 0.0, axis=0)
    return out


def fit_itemknn(x, p: Mapping, ks: list[int], factors: int, seed: int, threads: int):
    start = time.perf_counter()
    s = cosine_similarity(x, p["shrink"])
    shared = time.perf_counter() - start
    for k in ks:
        start = time.perf_counter()
        w = keep_top_k(s, k).T.astype(np.float32)
        yield k, (x.toarray(), w), shared + time.perf_counter() - start


def rp3beta_weights(x: sp.csr_matrix, alpha: float, beta: float) -> np.ndarray:
    """(N, N) RP3β item-item matrix W (zero diagonal), scores = X·W."""
    deg_u = np.asarray(x.sum(axis=1)).ravel()
    deg_i = np.asarray(x.sum(axis=0)).ravel()
    p_ui = x.multiply(1.0 / np.maximum(deg_u, 1.0)[:, None]).tocsr()  # user → item
    p_iu = x.T.multiply(1.0 / np.maximum(deg_i, 1.0)[:, None]).tocsr()  # item → user
    if alpha != 1.0:
        p_ui, p_iu = p_ui.power(alpha), p_iu.power(alpha)
    w = (p_iu @ p_ui).toarray().astype(np.float64)
    pop = np.zeros_like(deg_i, dtype=np.float64)
    seen = deg_i > 0
    pop[seen] = np.power(deg_i[seen], -beta)
    w *= pop[None, :]
    w[np.diag_indices_from(w)] = 0.0
    return w


def fit_rp3beta(x, p: Mapping, ks: list[int], factors: int, seed: int, threads: int):
    start = time.perf_counter()
    w = rp3beta_weights(x, p["alpha"], p["beta"])
    shared = time.perf_counter() - start
    for k in ks:
        start = time.perf_counter()
        # each source item i keeps its k largest W_ij (rows of W = columns of Wᵀ)
        v = keep_top_k(w.T, k).astype(np.float32)  # item vector of j = column j of W
        yield k, (x.toarray(), v), shared + time.perf_counter() - start


FITS: dict[str, Fit] = {
    "als": fit_als,
    "bpr": fit_bpr,
    "ease": fit_ease,
    "itemknn": fit_itemknn,
    "rp3beta": fit_rp3beta,
}


# --------------------------------------------------------------------------- selection


def grid_points(grid: Mapping[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def select(
    model: str,
    x: sp.csr_matrix,
    val: ValidationSet,
    factors: int,
    seed: int,
    threads: int = 1,
    grid: Mapping[str, list] | None = None,
) -> dict:
    """Fit ``model`` on ``x`` at every point of its grid; keep the best validation criterion.

    Sees only the fit input and the validation set. Returns {"params", "criterion",
    "validation" (metrics of the chosen point), "grid" (every point with its metrics),
    "vectors" and "fit_seconds" of the chosen model}.
    """
    grid = GRIDS[model] if grid is None else grid
    key = PATH_KEY[model]
    outer = {k: v for k, v in grid.items() if k != key}
    path = list(grid[key]) if key else [None]
    table, best = [], None
    for p in grid_points(outer):
        for value, vectors, seconds in FITS[model](x, p, path, factors, seed, threads):
            params = {**p, key: value} if key else dict(p)
            row = {"params": {k: params[k] for k in grid}, **score(vectors, val)}
            table.append(row)
            if best is None or row["criterion"] > best[0]["criterion"]:  # ties: first wins
                best = (row, vectors, seconds)
    row, vectors, seconds = best
    return {
        "params": row["params"],
        "criterion": row["criterion"],
        "validation": row["metrics"],
        "grid": table,
        "vectors": vectors,
        "fit_seconds": seconds,
    }


@dataclass
class CFRun:
    """A tuned baseline: the chosen model's vectors and how it was chosen."""

    method: str
    e: np.ndarray  # (n_users, D)
    v: np.ndarray  # (n_items, D)
    tuning: dict
    tune_seconds: float  # the whole validation grid
    train_seconds: float  # building the chosen model alone


def run_cf(method: str, enc: Encoded, n: int, factors: int, seed: int, threads: int) -> CFRun:
    """Select hyper-parameters on validation; the chosen model (as validated) is the result.
    ``threads``: implicit's OpenMP threads for ALS (0 → 1); BPR uses one."""
    model, signal = CF_METHODS[method]
    x = interactions(enc, signal)
    start = time.perf_counter()
    tuning = select(model, x, validation_set(enc, n), factors, seed, threads)
    tune_seconds = time.perf_counter() - start
    e, v = tuning.pop("vectors")
    train_seconds = tuning.pop("fit_seconds")
    tuning.update(
        model=model,
        signal=signal,
        selection="mean over validation click/conversion of (Recall@N + nDCG@N) / 2",
        deterministic=model in DETERMINISTIC,
        grid_spec=GRIDS[model],
    )
    return CFRun(
        method,
        np.ascontiguousarray(e, dtype=np.float32),
        np.ascontiguousarray(v, dtype=np.float32),
        tuning,
        tune_seconds,
        train_seconds,
    )
