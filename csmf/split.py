"""The per-user time split, shared by the trainer (train/validation/test) and the index builder
(the bundle's user histories must be exactly the trainer's train events).

Per user with ``n`` events in (timestamp, row) order: the latest ``n_test = max(1, round(n *
test_frac))`` are test (0 if ``test_frac == 0``), the ``n_val`` before them validation (same
rule), the rest train; validation shrinks first, then test, so every split user keeps at least one
train event. Users with fewer than ``min_events`` events are all train.

With ``test_from`` (a unix time, > 0) the split is global instead — what a daily update and its
evaluation on the latest period need: events at or after ``test_from`` are test; of the events
before it, those at or after the ``1 - val_frac`` quantile of their timestamps are validation
(ties stay together: the cut is a timestamp); the rest train. ``min_events`` does not apply.
"""

from __future__ import annotations

import numpy as np

from csmf.errors import ConfigError

TRAIN, VALIDATION, TEST = 0, 1, 2


def split_labels(
    user_codes: np.ndarray,
    timestamps: np.ndarray,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    min_events: int = 3,
    test_from: int = 0,
) -> np.ndarray:
    """(n,) int8 label per event, in input order: TRAIN, VALIDATION or TEST.

    ``user_codes`` are non-negative integers identifying the user of each event (any numbering).
    """
    if test_from:
        return global_labels(np.asarray(timestamps), val_frac, test_from)
    codes = np.asarray(user_codes, dtype=np.int64)
    n = len(codes)
    order = np.lexsort((np.asarray(timestamps), codes))  # stable: ties keep row order
    per_user = np.bincount(codes, minlength=int(codes.max(initial=-1)) + 1)  # (n_users,)
    starts = np.concatenate(([0], np.cumsum(per_user)[:-1]))
    n_val, n_test = split_counts(per_user, val_frac, test_frac, min_events)

    user_sorted = codes[order]  # (n,) user of each position in time order
    from_end = starts[user_sorted] + per_user[user_sorted] - 1 - np.arange(n)  # 0 = latest
    sorted_labels = np.full(n, TRAIN, np.int8)
    sorted_labels[from_end < (n_test + n_val)[user_sorted]] = VALIDATION
    sorted_labels[from_end < n_test[user_sorted]] = TEST
    labels = np.empty(n, np.int8)
    labels[order] = sorted_labels
    return labels


def global_labels(timestamps: np.ndarray, val_frac: float, test_from: int) -> np.ndarray:
    """The global time split (module docstring): (n,) int8 labels."""
    ts = np.asarray(timestamps, dtype=np.int64)
    labels = np.full(len(ts), TRAIN, np.int8)
    labels[ts >= test_from] = TEST
    return _label_validation(labels, ts, val_from(ts[ts < test_from], val_frac))


def val_from(before: np.ndarray, val_frac: float) -> int:
    """The first validation timestamp of the global split, given the timestamps before
    ``test_from``: the ``1 - val_frac`` quantile (no validation if ``val_frac`` is 0)."""
    if val_frac <= 0 or len(before) == 0:
        return np.iinfo(np.int64).max
    k = min(len(before) - 1, int(np.floor(len(before) * (1 - val_frac))))
    return int(np.partition(before, k)[k])


def _label_validation(labels: np.ndarray, ts: np.ndarray, first_val: int) -> np.ndarray:
    labels[(labels == TRAIN) & (ts >= first_val)] = VALIDATION
    return labels


def split_counts(
    per_user: np.ndarray, val_frac: float = 0.1, test_frac: float = 0.2, min_events: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(n_val, n_test) per user from each user's event count (the rule in the module docstring);
    the streaming split (trainer.data.stream) labels with the same counts."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ConfigError(
            f"val_frac and test_frac must be in [0, 1) with a sum < 1, got {val_frac}, {test_frac}"
        )
    if min_events < 1:
        raise ConfigError(f"min_events must be >= 1, got {min_events}")
    per_user = np.asarray(per_user, dtype=np.int64)

    def take(frac: float) -> np.ndarray:  # (n_users,) events per user for a fraction
        k = np.floor(per_user * frac + 0.5).astype(np.int64)
        return np.maximum(k, 1) if frac > 0 else k

    n_test = np.minimum(take(test_frac), np.maximum(per_user - 1, 0))
    n_val = np.minimum(take(val_frac), np.maximum(per_user - 1 - n_test, 0))
    small = per_user < min_events
    n_test[small] = 0
    n_val[small] = 0
    return n_val, n_test
