"""Objective weights → per-dimension query scale (the paper's Eq. 8;
docs/design.md#owned-units-and-why-one-search-is-exact).

With weights k_t per objective and output dims owned by objective owner(j), the fused score
sum_t k_t s_t(u, i) equals (c ⊙ e) · v with c_j = sum_{t >= owner(j)} k_t. For the cascade
[exposure, click, conversion] the slices are scaled by <k_d+k_o+k_r, k_o+k_r, k_r>.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

import csmf.objectives as funnel
from csmf.errors import WeightsError

DEFAULT_OBJECTIVES = funnel.NAMES
DEFAULT_WEIGHTS = (1.0, 1.8, 1.2)  # the paper's default triplet <k_d, k_o, k_r>
# Bounds of one weight. Query scales and scores are float32 (max ~3.4e38, ~7 significant digits):
# a weight of 1e308 overflows the scale to inf and every score to inf/NaN, and a weight more than
# ~1e6 times another cannot change a ranking anyway. Only ratios matter: scale weights into range.
MAX_WEIGHT = 1e6
MIN_LARGEST_WEIGHT = 1e-6  # the largest weight must reach this (smaller: scores underflow)


def parse_weights(
    weights: Mapping[str, float] | Sequence[float], objectives: Sequence[str]
) -> tuple[float, ...]:
    """Validate weights given by objective name or as a list in cascade order.

    Missing names in a mapping count as 0. Raises WeightsError naming the problem.
    """
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in objectives]
        if unknown:
            raise WeightsError(
                f"unknown objective(s) {unknown}; this model's cascade is {list(objectives)}"
            )
        values = [weights.get(o, 0.0) for o in objectives]
    else:
        values = list(weights)
        if len(values) != len(objectives):
            raise WeightsError(
                f"expected {len(objectives)} weights for cascade {list(objectives)}, got {len(values)}"
            )
    out = []
    for name, v in zip(objectives, values, strict=True):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise WeightsError(f"weight for {name!r} must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise WeightsError(f"weight for {name!r} must be finite, got {v!r}")
        if f < 0:
            raise WeightsError(f"weight for {name!r} must be >= 0, got {f}")
        if f > MAX_WEIGHT:
            raise WeightsError(
                f"weight for {name!r} must be <= {MAX_WEIGHT:g}, got {f:g} (scores are float32; "
                "only the ratios between weights matter, so scale them down)"
            )
        out.append(f)
    if not any(out):
        raise WeightsError("weights must not all be zero")
    if max(out) < MIN_LARGEST_WEIGHT:
        raise WeightsError(
            f"weights are too small: the largest is {max(out):g}, expected at least "
            f"{MIN_LARGEST_WEIGHT:g} (scores are float32; only the ratios matter, so scale them up)"
        )
    return tuple(out)


def objective_coefficients(weights: Sequence[float]) -> np.ndarray:
    """c_t = sum_{s >= t} k_s: the scale of the slice owned by objective t, (T,)."""
    k = np.asarray(weights, dtype=np.float64)
    return np.cumsum(k[::-1])[::-1].astype(np.float32)


def dim_scale(weights: Sequence[float], output_owner: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-output-dimension scale c_j for a model whose dim j is owned by output_owner[j], (D,);
    unowned dims (owner T, left for a later objective; always 0) get scale 0."""
    coef = np.append(objective_coefficients(weights), np.float32(0.0))
    return coef[np.minimum(np.asarray(output_owner, dtype=np.int64), len(weights))]


def slice_scale(weights: Sequence[float], slice_sizes: Sequence[int]) -> np.ndarray:
    """Per-dimension scale for contiguous slices [d | o | r] of the given sizes, (sum(sizes),)."""
    return np.repeat(objective_coefficients(weights), np.asarray(slice_sizes, dtype=np.int64))


def cumulative_slice_scores(e: np.ndarray, v: np.ndarray, slice_sizes: Sequence[int]) -> np.ndarray:
    """Per-objective scores s_t = sum over the dims of slices 0..t of e_j v_j, (k, T).

    ``e`` is one user vector (D,) and ``v`` the (k, D) item vectors, slices contiguous in cascade
    order. One matrix product: ``v @ (e[:, None] * A)`` with A[j, t] = 1 when dim j's slice is
    <= t (cached per slice sizes). An objective that owns no dims (slice size 0) gets the previous
    objective's score, as the sum says. (A prefix sum over ``v * e`` gives the same with four
    numpy calls and a temporary per call; this is one, on the explain hot path.)
    """
    return v @ (e[:, None] * _owned_by_or_before(tuple(slice_sizes)))


@lru_cache(maxsize=64)
def _owned_by_or_before(slice_sizes: tuple[int, ...]) -> np.ndarray:
    """(D, T) float32: 1 where dim j belongs to slice t or an earlier one."""
    owner = np.repeat(np.arange(len(slice_sizes)), slice_sizes)  # (D,) slice of each dim
    return (owner[:, None] <= np.arange(len(slice_sizes))[None, :]).astype(np.float32)
