"""Weighted-query ANN recall: ANN top-k vs exact top-k on real user vectors under several objective
weightings: slice-scaled queries are harder for HNSW than plain ones
(docs/design.md#the-recall-check).

Ties are allowed, as in faiss ``contrib/evaluation.py``: an ANN result counts as correct when its
exact score reaches the exact k-th score, so equal-scoring items are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from csmf.errors import CsmfError
from csmf.index import VectorIndex
from csmf.weights import DEFAULT_WEIGHTS, slice_scale


class RecallFloorError(CsmfError, RuntimeError):
    """The ANN index misses the configured recall floor on weighted queries."""


def weight_grid(num_objectives: int) -> list[tuple[float, ...]]:
    """The default triplet (⟨1, 1.8, 1.2⟩ for a 3-stage cascade, all ones otherwise), each
    objective alone (⟨1,0,0⟩, ⟨0,1,0⟩, ...), and all ones."""
    t = num_objectives
    default = tuple(DEFAULT_WEIGHTS) if t == len(DEFAULT_WEIGHTS) else (1.0,) * t
    grid = [default]
    grid += [tuple(1.0 if i == j else 0.0 for i in range(t)) for j in range(t)]
    grid.append((1.0,) * t)
    out: list[tuple[float, ...]] = []
    for w in grid:
        if w not in out:
            out.append(tuple(float(x) for x in w))
    return out


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k, (Q, k) scores and rows."""
    return faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )


def recall_with_ties(
    vectors: np.ndarray, queries: np.ndarray, ann_rows: np.ndarray, exact_scores: np.ndarray
) -> np.ndarray:
    """Per-query recall@k: share of the k ANN results whose exact score >= the exact k-th score."""
    k = ann_rows.shape[1]
    valid = ann_rows >= 0
    rows = np.where(valid, ann_rows, 0)
    scores = np.einsum("qd,qkd->qk", queries, vectors[rows])  # (Q, k) exact scores of ANN results
    kth = exact_scores[:, -1:]  # (Q, 1)
    tol = 1e-5 * np.maximum(1.0, np.abs(kth))
    hits = valid & (scores >= kth - tol)
    return hits.sum(1) / k


def weighted_recall(
    index: VectorIndex,
    vectors: np.ndarray,
    users: np.ndarray,
    slice_sizes: Sequence[int],
    k: int,
    grid: Sequence[Sequence[float]],
    exact: dict | None = None,
) -> dict[str, Any]:
    """Recall@k of ``index`` (with its current search params) for every weighting in ``grid``.
    ``exact`` caches the brute-force top-k per weighting across calls (same users, same k)."""
    k = min(k, len(vectors))
    exact = {} if exact is None else exact
    results = []
    for w in grid:
        q = np.ascontiguousarray(users * slice_scale(w, slice_sizes), dtype=np.float32)  # (Q, D)
        key = tuple(w)
        if key not in exact:
            exact[key] = exact_topk(vectors, q, k)[0]
        exact_s = exact[key]
        _, ann_rows = index.search(q, k)
        r = recall_with_ties(vectors, q, ann_rows, exact_s)
        results.append({"weights": [float(x) for x in w], "recall": round(float(r.mean()), 5)})
    return {
        "k": k,
        "queries": int(len(users)),
        "by_weights": results,
        "min_recall": min(r["recall"] for r in results),
    }


def check_recall(
    index: VectorIndex,
    vectors: np.ndarray,
    users: np.ndarray,
    slice_sizes: Sequence[int],
    k: int,
    floor: float,
    grid: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """Measure weighted recall; raise RecallFloorError (suggesting measured parameters) if any
    weighting falls below ``floor``. Returns the report recorded in the manifest."""
    report = weighted_recall(index, vectors, users, slice_sizes, k, grid)
    report["floor"] = floor
    report["passed"] = report["min_recall"] >= floor
    if report["passed"]:
        return report
    worst = min(report["by_weights"], key=lambda r: r["recall"])
    search_params = index.search_params
    hint = _suggest(index, vectors, users, slice_sizes, k, floor, grid)
    index.set_search_params(search_params)  # undo the probing
    kind = index.capabilities.kind
    raise RecallFloorError(
        f"ANN recall@{report['k']} on weighted queries is {worst['recall']:.4f} for weights "
        f"{worst['weights']}, below the floor {floor} ({kind} {search_params}); {hint}. "
        "No bundle was published."
    )


TUNE_LADDER = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512,
               768, 1024, 1536, 2048, 3072, 4096)  # fmt: skip


def tune_search_params(
    index: VectorIndex,
    vectors: np.ndarray,
    users: np.ndarray,
    slice_sizes: Sequence[int],
    k: int,
    target: float,
    grid: Sequence[Sequence[float]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The smallest nprobe (IVF) / efSearch (HNSW) on a ladder, up to the configured value, whose
    min weighted recall on ``users`` reaches ``target``; the configured value if none does.

    Recall grows with the knob, so the ladder is bisected (about log2(len) evaluations; the exact
    top-k is computed once). Returns (params to serve with, the evaluations made). The index is
    left set to the returned params.
    """
    params = index.search_params
    if index.knob() is None:
        return params, []
    knob, limit = index.knob()
    cap = min(int(params[knob]), limit)
    ladder = [v for v in TUNE_LADDER if v < cap] + [cap]
    if knob == "ef_search":
        ladder = [v for v in ladder if v >= k] or [cap]  # efSearch below k returns < k results
    exact: dict = {}
    trace: list[dict[str, Any]] = []

    def passes(v: int) -> bool:
        index.set_search_params({**params, knob: v})
        r = weighted_recall(index, vectors, users, slice_sizes, k, grid, exact)["min_recall"]
        trace.append({knob: v, "min_recall": r})
        return r >= target

    lo, hi = 0, len(ladder) - 1  # answer in ladder[lo..hi]; ladder[hi] is the fallback
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(ladder[mid]):
            hi = mid
        else:
            lo = mid + 1
    chosen = {**params, knob: ladder[hi]}
    index.set_search_params(chosen)
    return chosen, trace


def _suggest(
    index: VectorIndex,
    vectors: np.ndarray,
    users: np.ndarray,
    slice_sizes: Sequence[int],
    k: int,
    floor: float,
    grid: Sequence[Sequence[float]],
) -> str:
    """Try larger search-time parameters on the built index and name the first that passes."""
    if index.knob() is None:
        return "an exact flat index cannot miss: check the vectors for NaN"
    knob, cap = index.knob()
    params = index.search_params
    kind = index.capabilities.kind
    flag = "--" + knob.replace("_", "-")
    value = int(params[knob])
    tried, exact = [], {}  # exact top-k per weighting, computed once
    while value < cap:
        value = min(value * 2, cap)
        index.set_search_params({**params, knob: value})
        r = weighted_recall(index, vectors, users, slice_sizes, k, grid, exact)["min_recall"]
        tried.append(f"{value}: {r:.4f}")
        if r >= floor:
            return (
                f"measured on this index, {flag} {value} reaches {r:.4f} (tried {', '.join(tried)})"
            )
        if len(tried) >= 4:
            break
    more = (
        "--hnsw-m / --ef-construction"
        if kind == "hnsw"
        else "--rerank (exact re-rank of PQ candidates) or --pq-m"
        if kind == "ivfpq"
        else "--nlist (fewer, larger lists); with item norms that vary, --index hnsw does better"
    )
    return (
        f"raise {flag} beyond {value} (tried {', '.join(tried) or 'none'}), "
        f"or rebuild with larger {more}, or use --index flat"
    )
