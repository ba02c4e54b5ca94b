"""The dataset folder (docs/design.md#data-formats): load + validate, split per user by time,
publish atomically.

A dataset is a folder holding ``events.parquet`` or ``events/part-*.parquet``, ``users.parquet``,
``items.parquet``, optionally ``candidates.parquet`` and ``truth.npz`` (synthetic data), and
``dataset.json`` (metadata). Writers stage everything in ``<out>/.tmp-*`` and move it into place
with ``os.replace``, ``dataset.json`` last, so a failed write never leaves a half dataset behind a
fresh ``dataset.json``.

Validation errors are ``DataError`` with one line naming the file, the column, how many rows are
bad and a few example values.

The service's event log (service/event_log.py) is a valid ``events/`` folder, recognised by its
``cold_start`` column. It records every request, so some of its rows cannot train: cold-start
and history-only requests (no user row; ``user_id`` null for the latter), and users or items the
dataset's tables do not have (the catalogue or user table moved on since serving). Those rows are
skipped and counted in ``Dataset.skipped`` — one ``warning:`` line on stderr says how many and why
— instead of refusing the whole log. Any other dataset keeps the strict contract: an unknown id is
an error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import csmf.objectives as funnel
from csmf.atomic import fsync_path, fsync_tree
from csmf.errors import DataError
from csmf.features import FeatureSpec, TowerSpec
from csmf.split import TEST, TRAIN, VALIDATION, split_labels

OBJECTIVES: tuple[str, ...] = funnel.NAMES
EVENT_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", *funnel.LABEL_COLUMNS)
LOG_MARKER = "cold_start"  # the column that marks an events table as the service's event log
# Everything a writer may produce; publishing removes the ones a new dataset does not have.
DATASET_ENTRIES: tuple[str, ...] = (
    "events.parquet",
    "events",
    "users.parquet",
    "items.parquet",
    "candidates.parquet",
    "truth.npz",
    "dataset.json",
)
_N_EXAMPLES = 3


@dataclass
class Dataset:
    root: Path
    events: pa.Table  # user_id, item_id, timestamp, clicked, converted[, request_id] (+ extras)
    users: pa.Table
    items: pa.Table
    candidates: pa.Table | None
    meta: dict  # dataset.json, {} if absent
    skipped: dict[str, int] = field(default_factory=dict)  # event log: reason -> rows skipped

    def counts(self) -> dict[str, int]:
        n = self.events.num_rows
        return {
            "users": self.users.num_rows,
            "items": self.items.num_rows,
            **{o.plural: label_count(self.events, o, n) for o in funnel.FUNNEL},
        }


@dataclass
class Split:
    """Row indices into ``Dataset.events``, each sorted ascending."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# --------------------------------------------------------------------------- loading


def load_dataset(
    root: str | Path,
    spec: FeatureSpec | None = None,
    *,
    objectives: Sequence[str] = OBJECTIVES,
) -> Dataset:
    """Read and validate a dataset folder; raise ``DataError`` on the first problem found.

    ``spec`` adds checks that every feature column it names exists with a fitting type.
    ``objectives`` are the cascade's objectives: each must have at least one positive.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist (or is not a folder)")
    events, events_name = _read_events(root)
    users = _read_parquet(root / "users.parquet")
    items = _read_parquet(root / "items.parquet")
    cand_path = root / "candidates.parquet"
    candidates = _read_parquet(cand_path) if cand_path.exists() else None
    rows = {events_name: events.num_rows, "users.parquet": users.num_rows}
    rows |= {"items.parquet": items.num_rows}
    if candidates is not None:
        rows["candidates.parquet"] = candidates.num_rows

    is_log = LOG_MARKER in events.column_names
    skipped: dict[str, int] = {}
    try:
        if is_log:
            events = _drop_cold_rows(events, events_name, skipped)
        events = _check_events(events, events_name, objectives)
        users = _check_entities(users, "users.parquet", "user_id", events, events_name)
        items = _check_entities(items, "items.parquet", "item_id", events, events_name)
        if spec is not None:
            _check_features(users, "users.parquet", spec.user)
            _check_features(items, "items.parquet", spec.item)
        if is_log:
            events = _drop_unknown_rows(events, events_name, users, items, objectives, skipped)
        _check_references(events, events_name, users, "users.parquet", "user_id")
        _check_references(events, events_name, items, "items.parquet", "item_id")
        if candidates is not None:
            candidates = _check_candidates(candidates, events, events_name, items)
    except DataError as exc:
        raise DataError(_located(root, str(exc), rows)) from None
    warn_skipped(root / events_name, skipped, rows[events_name])
    return Dataset(root, events, users, items, candidates, _read_meta(root), skipped)


def warn_skipped(where: Path, skipped: dict[str, int], total: int) -> None:
    """The one ``warning:`` line for the event-log rows that cannot train (both loaders)."""
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
        print(
            f"warning: {where}: event log, skipped {sum(skipped.values())} of {total} rows that "
            f"cannot train ({reasons})",
            file=sys.stderr,
        )


def _drop_cold_rows(events: pa.Table, name: str, skipped: dict[str, int]) -> pa.Table:
    """Event log: drop cold-start and history-only rows (no user row to train on)."""
    if "user_id" not in events.column_names:
        return events  # _check_events names the missing column
    cold = events[LOG_MARKER].fill_null(False)
    if not pa.types.is_boolean(cold.type):
        raise DataError(f"{name}: column {LOG_MARKER} must be bool, got {cold.type}")
    no_user = events["user_id"].is_null()
    history_only = _count_true(no_user)
    drop = pc.or_(cold, no_user)
    n_cold = _count_true(drop) - history_only
    if n_cold:
        skipped["cold-start (unknown user)"] = n_cold
    if history_only:
        skipped["history-only (no user id)"] = history_only
    return events.filter(pc.invert(drop)) if n_cold or history_only else events


def _drop_unknown_rows(
    events: pa.Table,
    name: str,
    users: pa.Table,
    items: pa.Table,
    objectives: Sequence[str],
    skipped: dict[str, int],
) -> pa.Table:
    """Event log: drop rows whose user or item the dataset's tables do not have; the objectives
    must still have positives afterwards."""
    keep = None  # a row is counted once, under its first reason
    for table, col, why in ((users, "user_id", "user"), (items, "item_id", "item")):
        known = pc.is_in(events[col], value_set=table[col].combine_chunks())
        now = known if keep is None else pc.and_(keep, known)
        n = (events.num_rows if keep is None else _count_true(keep)) - _count_true(now)
        if n:
            skipped[f"{why} not in {why}s.parquet"] = n
        keep = now
    if keep is None or _count_true(keep) == events.num_rows:
        return events
    events = events.filter(keep)
    n = events.num_rows
    check_positives(name, {o.name: label_count(events, o, n) for o in funnel.FUNNEL}, n, objectives)
    return events


def _located(root: Path, msg: str, rows: dict[str, int]) -> str:
    """A check's ``<file>: <problem>`` message with the file's full path and its row count, so
    the one error line names the file, the column and how many rows there are."""
    name = msg.split(": ", 1)[0]
    if name not in rows:
        return msg
    count = "" if "no rows" in msg else f" ({name} has {rows[name]} rows)"
    return f"{root / name}{'/' if name.endswith('/') else ''}: {msg.split(': ', 1)[1]}{count}"


def _read_events(root: Path) -> tuple[pa.Table, str]:
    single, folder = root / "events.parquet", root / "events"
    if single.exists() and folder.exists():
        raise DataError(f"{root}: both events.parquet and events/ exist; keep exactly one of them")
    if single.exists():
        return _read_parquet(single), "events.parquet"
    if folder.is_dir():
        parts = sorted(folder.glob("part-*.parquet"))
        if not parts:
            raise DataError(f"{folder}: no part-*.parquet files in the events/ folder")
        tables = [_read_parquet(p) for p in parts]
        try:
            return pa.concat_tables(tables), "events/"
        except pa.ArrowInvalid as exc:
            first = tables[0].schema
            bad = next(p for p, t in zip(parts, tables, strict=True) if t.schema != first)
            raise DataError(
                f"{bad}: schema differs from {parts[0].name} ({_one_line(exc)})"
            ) from None
    raise DataError(f"{root}: missing events (expected events.parquet or an events/ folder)")


def _read_parquet(path: Path) -> pa.Table:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from None


def _read_meta(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({_one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


# --------------------------------------------------------------------------- validation


def _check_events(events: pa.Table, name: str, objectives: Sequence[str]) -> pa.Table:
    for o in objectives:
        funnel.get(o)  # ConfigError naming the known ones
    added = [funnel.get(o) for o in objectives if o not in OBJECTIVES]
    _require_columns(events, name, (*EVENT_COLUMNS, *(o.column for o in added)))
    for o in added:  # an objective added to a trained cascade: its own bool label column
        _no_nulls(events, name, o.column)
        if not pa.types.is_boolean(events.schema.field(o.column).type):
            raise DataError(
                f"{name}: column {o.column} ({o.name} positives) must be bool, got "
                f"{events.schema.field(o.column).type}"
            )
        if not _count_true(events[o.column]):
            raise DataError(
                f"{name}: column {o.column} is never true ({events.num_rows} rows), so the "
                f"{o.name} objective has no positives"
            )
    for col in ("user_id", "item_id"):
        events = _normalise_id(events, name, col)
    events = _cast_integer(events, name, "timestamp")
    if "request_id" in events.column_names:
        events = _cast_integer(events, name, "request_id")
    for col in ("timestamp", *funnel.LABEL_COLUMNS):
        _no_nulls(events, name, col)
    for col in funnel.LABEL_COLUMNS:
        if not pa.types.is_boolean(events.schema.field(col).type):
            raise DataError(
                f"{name}: column {col} must be bool, got {events.schema.field(col).type}"
            )
    for o in funnel.FUNNEL:  # each label implies its parent's (converted => clicked)
        parent = funnel.get(o.parent) if o.parent is not None else None
        if o.column is None or parent is None or parent.column is None:
            continue
        broken = pc.and_(events[o.column], pc.invert(events[parent.column]))
        n_broken = _count_true(broken)
        if n_broken:
            rows = np.flatnonzero(broken.to_numpy(zero_copy_only=False))[:_N_EXAMPLES]
            raise DataError(
                f"{name}: {n_broken} rows have {o.column}=true but {parent.column}=false, "
                f"violating the cascade {o.column} => {parent.column} "
                f"(e.g. rows {', '.join(map(str, rows))})"
            )
    n = events.num_rows
    check_positives(name, {o.name: label_count(events, o, n) for o in funnel.FUNNEL}, n, objectives)
    return events


def label_count(events: pa.Table, o: funnel.Objective, n: int) -> int:
    """Positives of objective ``o`` among ``n`` event rows (every row for the exposure log)."""
    return n if o.column is None else _count_true(events[o.column])


def check_positives(
    name: str, positives: dict[str, int], n_rows: int, objectives: Sequence[str]
) -> None:
    """Every objective the cascade trains needs positives; the error names the column."""
    for o in funnel.FUNNEL:
        if o.name in objectives and positives[o.name] == 0:
            what = (
                "no rows"
                if o.column is None
                else f"column {o.column} is never true ({n_rows} rows)"
            )
            raise DataError(f"{name}: {what}, so the {o.name} objective has no positives")


def _check_entities(
    table: pa.Table, name: str, id_col: str, events: pa.Table, events_name: str
) -> pa.Table:
    _require_columns(table, name, (id_col,))
    table = _normalise_id(table, name, id_col)
    want, got = events.schema.field(id_col).type, table.schema.field(id_col).type
    if want != got:
        raise DataError(
            f"{name}: column {id_col} is {got} but {events_name} has {id_col} as {want}; "
            "ids must have the same type on both sides"
        )
    ids = table[id_col]
    n_unique = len(pc.unique(ids))
    if n_unique != table.num_rows:
        counts = pc.value_counts(ids).flatten()
        dup = pc.filter(counts[0], pc.greater(counts[1], 1))
        raise DataError(
            f"{name}: {table.num_rows - n_unique} rows duplicate an earlier {id_col} "
            f"(e.g. {_fmt(dup)})"
        )
    return table


def _check_features(table: pa.Table, name: str, tower: TowerSpec) -> None:
    if tower.id_column not in table.column_names:
        raise DataError(
            f"{name}: missing id column {tower.id_column!r} named in the feature spec "
            f"(columns: {', '.join(table.column_names)})"
        )
    for f in tower.fields:
        if f.name not in table.column_names:
            raise DataError(
                f"{name}: missing feature column {f.name!r} ({f.kind}) named in the feature spec "
                f"(columns: {', '.join(table.column_names)})"
            )
        t = table.schema.field(f.name).type
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        ok = {
            "numeric": pa.types.is_integer(t) or pa.types.is_floating(t),
            "multi_hot": is_list,
            "categorical": not is_list and not pa.types.is_nested(t),
        }[f.kind]
        if not ok:
            expected = {"numeric": "a number", "multi_hot": "a list", "categorical": "a scalar"}
            raise DataError(
                f"{name}: column {f.name} is {f.kind} in the feature spec but has type {t}; "
                f"expected {expected[f.kind]}"
            )


def _check_references(
    events: pa.Table, events_name: str, table: pa.Table, name: str, id_col: str
) -> None:
    missing = pc.invert(pc.is_in(events[id_col], value_set=table[id_col].combine_chunks()))
    n_missing = _count_true(missing)
    if n_missing:
        bad = pc.unique(pc.filter(events[id_col], missing))
        raise DataError(
            f"{events_name}: {n_missing} rows have {id_col} not in {name} (e.g. {_fmt(bad)})"
        )


def _check_candidates(
    cand: pa.Table, events: pa.Table, events_name: str, items: pa.Table
) -> pa.Table:
    name = "candidates.parquet"
    _require_columns(cand, name, ("request_id", "item_id"))
    if "request_id" not in events.column_names:
        raise DataError(
            f"{name}: present, but {events_name} has no request_id column to link candidates to"
        )
    cand = _cast_integer(cand, name, "request_id")
    cand = _normalise_id(cand, name, "item_id")
    _no_nulls(cand, name, "request_id")
    want, got = events.schema.field("item_id").type, cand.schema.field("item_id").type
    if want != got:
        raise DataError(f"{name}: column item_id is {got} but {events_name} has item_id as {want}")
    known_requests = pc.unique(events["request_id"].drop_null())
    for col, value_set, where in (
        ("request_id", known_requests, f"{events_name} request_id"),
        ("item_id", items["item_id"].combine_chunks(), "items.parquet"),
    ):
        missing = pc.invert(pc.is_in(cand[col], value_set=value_set))
        n_missing = _count_true(missing)
        if n_missing:
            bad = pc.unique(pc.filter(cand[col], missing))
            raise DataError(
                f"{name}: {n_missing} rows have {col} not in {where} (e.g. {_fmt(bad)})"
            )
    return cand


def _require_columns(table: pa.Table, name: str, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataError(
            f"{name}: missing required column(s) {', '.join(missing)} "
            f"(columns: {', '.join(table.column_names) or 'none'})"
        )


def _normalise_id(table: pa.Table, name: str, col: str) -> pa.Table:
    """Ids are int64 or string: cast other integer/string/dictionary types, reject the rest."""
    t = table.schema.field(col).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        target = pa.int64()
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        target = pa.string()
        _valid_utf8(table, name, col)
    else:
        raise DataError(f"{name}: column {col} must be int64 or string, got {t}")
    table = _set(table, col, table[col].cast(target))
    _no_nulls(table, name, col)
    return table


def _valid_utf8(table: pa.Table, name: str, col: str) -> None:
    """Parquet does not enforce UTF-8 in string columns; an id that is not UTF-8 would break
    later (vocabularies, JSON, the bundle), so refuse it here, naming rows."""
    try:
        table[col].validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    values = _raw_bytes(table[col])
    bad = [i for i, v in enumerate(values) if v is not None and not _is_utf8(v)]
    raise DataError(
        f"{name}: column {col} has {len(bad)} ids that are not valid UTF-8 (e.g. rows "
        f"{', '.join(map(str, bad[:_N_EXAMPLES]))}: {values[bad[0]][:40]!r}); "
        "ids must be UTF-8 strings or integers"
    )


def _raw_bytes(values: pa.ChunkedArray) -> list[bytes | None]:
    """The bytes of a string column without UTF-8 decoding (a zero-copy view as binary)."""
    binary = pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary()
    return [v for chunk in values.chunks for v in chunk.view(binary).to_pylist()]


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _cast_integer(table: pa.Table, name: str, col: str) -> pa.Table:
    t = table.schema.field(col).type
    if not pa.types.is_integer(t):
        raise DataError(f"{name}: column {col} must be an integer (int64), got {t}")
    return _set(table, col, table[col].cast(pa.int64()))


def _no_nulls(table: pa.Table, name: str, col: str) -> None:
    n = table[col].null_count
    if n:
        rows = np.flatnonzero(table[col].is_null().to_numpy(zero_copy_only=False))[:_N_EXAMPLES]
        raise DataError(
            f"{name}: column {col} has {n} null values (e.g. rows {', '.join(map(str, rows))})"
        )


def _set(table: pa.Table, col: str, values: pa.ChunkedArray) -> pa.Table:
    if values.type == table.schema.field(col).type:
        return table
    return table.set_column(table.column_names.index(col), col, values)


def _count_true(values: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(values.cast(pa.int64())).as_py() or 0)


def _fmt(values: pa.Array | pa.ChunkedArray) -> str:
    shown = [v.as_py() for v in values[:_N_EXAMPLES]]
    text = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in shown)
    return text + (", ..." if len(values) > _N_EXAMPLES else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------- split


def split_by_time(
    events: pa.Table,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    min_events: int = 3,
    test_from: int = 0,
) -> Split:
    """Per user, order events by (timestamp, row index): the last ``test_frac`` are test, the
    ``val_frac`` before them validation, the rest train. Users with fewer than ``min_events``
    events are all train.

    Counts per user with ``n`` events: ``n_test = max(1, round(n * test_frac))`` (0 if
    ``test_frac == 0``), likewise ``n_val``; validation shrinks first, then test, so that every
    split user keeps at least one train event.
    """
    codes = pc.dictionary_encode(events["user_id"].combine_chunks()).indices.to_numpy()
    ts = events["timestamp"].to_numpy()
    labels = split_labels(codes, ts, val_frac, test_frac, min_events, test_from)
    return Split(
        train=np.flatnonzero(labels == TRAIN),
        val=np.flatnonzero(labels == VALIDATION),
        test=np.flatnonzero(labels == TEST),
    )


# --------------------------------------------------------------------------- writing


@contextmanager
def staged_dataset(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder inside ``out``; on success move its entries into ``out``.

    The body must write ``dataset.json`` into the staging folder; it is moved last. Entries of
    an older dataset in ``out`` that the new one does not have (e.g. ``events/`` when the new
    dataset has ``events.parquet``) are removed; unrelated files are left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
    try:
        yield tmp
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> None:
    if not (tmp / "dataset.json").exists():
        raise RuntimeError(f"{tmp}: staged dataset has no dataset.json; refusing to publish")
    fsync_tree(tmp)  # on disk before anything is renamed into place
    (out / "dataset.json").unlink(missing_ok=True)  # readers never see old metadata on new data
    for name in DATASET_ENTRIES:
        if name == "dataset.json":
            continue
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if (tmp / name).exists():
            os.replace(tmp / name, target)
    os.replace(tmp / "dataset.json", out / "dataset.json")
    fsync_path(out)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
