"""The user snapshot for the embedded feature store: raw user features + behaviour history.

History rule, kept independent of trainer/ (which the service must never need) but identical to
it: ``history="train"`` reproduces the trainer's per-user time split
(``trainer.data.dataset.split_by_time`` with the run's ``[split]`` val_frac/test_frac/min_events)
and keeps the *train* events — what the model saw as this user's history at evaluation time —
filtered by the history spec's ``source`` (every exposure, or clicks only). ``history="all"``
keeps every event (a live system whose users have moved on past the training window). Stored in
full, oldest → newest; the encoder keeps the last ``max_len``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import csmf.objectives as funnel
from csmf.bundle import HISTORY_COLUMN, UserSnapshot
from csmf.errors import ConfigError, DataError
from csmf.features import TowerSpec
from csmf.split import TRAIN, split_labels
from index_builder.encode import read_table

SPLIT_DEFAULTS = {"val_frac": 0.1, "test_frac": 0.2, "min_events": 3}  # trainer's defaults


def train_mask(
    user_codes: np.ndarray, timestamps: np.ndarray, split: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(order, is_train): ``order`` sorts the events of known users (code >= 0) by (user, time,
    file order); ``is_train[j]`` says whether the j-th sorted event is in its user's train split —
    the trainer's split rule, from ``csmf.split``."""
    order = np.lexsort((np.arange(len(user_codes)), timestamps, user_codes))
    order = order[user_codes[order] >= 0]  # events of users missing from the users table
    labels = split_labels(
        user_codes[order],
        timestamps[order],
        float(split["val_frac"]),
        float(split["test_frac"]),
        int(split["min_events"]),
        int(split.get("test_from", 0)),
    )
    return order, labels == TRAIN


def build_user_snapshot(
    dataset: str | Path,
    spec: TowerSpec,
    out: str | Path,
    history: str = "train",
    split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (users.parquet of the bundle) from the dataset folder; returns a summary."""
    dataset = Path(dataset)
    users = read_table(dataset / "users.parquet")
    if spec.id_column not in users.column_names:
        raise DataError(f"{dataset / 'users.parquet'} lacks id column {spec.id_column!r}")
    ids = pc.cast(users.column(spec.id_column), pa.string()).combine_chunks()
    feature_cols = [f.name for f in spec.fields if f.name in users.column_names]
    if HISTORY_COLUMN in feature_cols:
        raise DataError(f"user feature column may not be named {HISTORY_COLUMN!r}")
    columns = {c: users.column(c).combine_chunks() for c in feature_cols}
    if history not in ("train", "all"):
        raise ConfigError(f"history must be 'train' or 'all', got {history!r}")
    split = {**SPLIT_DEFAULTS, **(split or {})} if history == "train" else None
    histories, n_events = _histories(dataset, spec, ids, split)
    UserSnapshot.write(out, spec.id_column, ids.to_pylist(), columns, histories)
    return {
        "users": len(ids),
        "history_events": n_events,
        "history": history,
        "split": split,
        "history_source": spec.history.source if spec.history else None,
        "id_column": spec.id_column,
        "feature_columns": feature_cols,
    }


def _histories(
    dataset: Path, spec: TowerSpec, ids: pa.Array, split: Mapping[str, Any] | None
) -> tuple[pa.ListArray, int]:
    n = len(ids)
    # events are one file or a folder of part files (the synthetic generator streams;
    # docs/design.md#the-dataset-folder)
    events_path = dataset / "events.parquet"
    if not events_path.exists() and (dataset / "events").is_dir():
        events_path = dataset / "events"
    if spec.history is None or not events_path.exists():
        empty = pa.ListArray.from_arrays(
            pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())
        )
        return empty, 0
    source = funnel.get(spec.history.source)  # whose positives form the history
    cols = ["user_id", "item_id", "timestamp", *([source.column] if source.column else [])]
    events = (
        read_table(events_path).select(cols)
        if events_path.is_file()
        else pq.read_table(events_path, columns=cols)
    )
    codes = pc.index_in(pc.cast(events.column("user_id"), pa.string()), value_set=ids)
    codes = pc.fill_null(codes, -1).to_numpy().astype(np.int64)  # -1: user not in users table
    ts = events.column("timestamp")
    ts = pc.cast(ts, pa.int64()) if pa.types.is_timestamp(ts.type) else ts
    ts = ts.to_numpy().astype(np.float64)
    if split is None:
        order = np.lexsort((np.arange(len(codes)), ts, codes))
        order = order[codes[order] >= 0]
        keep = np.ones(len(order), bool)
    else:
        order, keep = train_mask(codes, ts, split)
    if source.column is not None:
        labels = {source.column: events.column(source.column).to_numpy(zero_copy_only=False)}
        keep &= source.positive(labels, events.num_rows)[order]
    rows = order[keep]  # sorted by (user, time)
    counts = np.bincount(codes[rows], minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    items = pc.cast(events.column("item_id"), pa.string()).take(pa.array(rows)).combine_chunks()
    return pa.ListArray.from_arrays(pa.array(offsets), items), int(len(rows))
