"""Paired significance tests over seeds: is method A's metric different from method B's when both
ran on the same seeds and splits?

- :func:`paired_t`: the two-sided paired t-test (Student): t = mean(d) / (sd(d) / √n) over the
  per-seed differences d, n − 1 degrees of freedom (``scipy.stats.ttest_rel``);
- :func:`wilcoxon`: the two-sided exact Wilcoxon signed-rank test on the same differences
  (distribution-free; with 5 seeds its smallest attainable p is 2/2⁵ = 0.0625, so it can never
  reach 0.05 — reported beside the t-test, not instead of it).

Both return NaN when every difference is 0 (the test is undefined: the two are identical).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired tests need two equal-length series of >= 2 values, got {a}, {b}")
    return a - b


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test of a − b."""
    d = _diffs(a, b)
    if np.all(d == d[0]):  # no variance: t is ±inf (or undefined when all zero)
        if d[0] == 0:
            return float("nan"), float("nan")
        return float(np.sign(d[0]) * np.inf), 0.0
    res = stats.ttest_rel(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return float(res.statistic), float(res.pvalue)


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact Wilcoxon signed-rank p of a − b (NaN if all differences are 0)."""
    d = _diffs(a, b)
    if np.all(d == 0):
        return float("nan")
    return float(stats.wilcoxon(d, method="exact").pvalue)
