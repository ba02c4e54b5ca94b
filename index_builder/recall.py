"""Weighted-query ANN recall: ANN top-k vs exact top-k on real user vectors under several objective
weightings (DESIGN §4, §8: slice-scaled queries are harder for HNSW than plain ones).

Ties are allowed, as in faiss ``contrib/evaluation.py``: an ANN result counts as correct when its
exact score reaches the exact k-th score, so equal-scoring items are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from csmf.bundle import apply_search_params
from csmf.errors import CsmfError
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
    index: faiss.Index,
    vectors: np.ndarray,
    users: np.ndarray,
    slice_sizes: Sequence[int],
    k: int,
    grid: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """Recall@k of ``index`` (with its current search params) for every weighting in ``grid``."""
    k = min(k, len(vectors))
    results = []
    for w in grid:
        q = np.ascontiguousarray(users * slice_scale(w, slice_sizes), dtype=np.float32)  # (Q, D)
        exact_s, _ = exact_topk(vectors, q, k)
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
    index: faiss.Index,
    kind: str,
    search_params: dict[str, Any],
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
    hint = _suggest(index, kind, search_params, vectors, users, slice_sizes, k, floor, grid)
    apply_search_params(index, kind, search_params)  # undo the probing
    raise RecallFloorError(
        f"ANN recall@{report['k']} on weighted queries is {worst['recall']:.4f} for weights "
        f"{worst['weights']}, below the floor {floor} ({kind} {search_params}); {hint}. "
        "No bundle was published."
    )


def _suggest(
    index: faiss.Index,
    kind: str,
    params: dict[str, Any],
    vectors: np.ndarray,
    users: np.ndarray,
    slice_sizes: Sequence[int],
    k: int,
    floor: float,
    grid: Sequence[Sequence[float]],
) -> str:
    """Try larger search-time parameters on the built index and name the first that passes."""
    if kind == "hnsw":
        knob, flag, cap = "ef_search", "--ef-search", 4096
    elif kind == "ivf":
        knob, flag, cap = "nprobe", "--nprobe", faiss.extract_index_ivf(index).nlist
    else:
        return "an exact flat index cannot miss: check the vectors for NaN"
    value = int(params[knob])
    tried = []
    while value < cap:
        value = min(value * 2, cap)
        apply_search_params(index, kind, {knob: value})
        r = weighted_recall(index, vectors, users, slice_sizes, k, grid)["min_recall"]
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
        else "--nlist (fewer, larger lists); with item norms that vary, --index hnsw does better"
    )
    return (
        f"raise {flag} beyond {value} (tried {', '.join(tried) or 'none'}), "
        f"or rebuild with larger {more}, or use --index flat"
    )
