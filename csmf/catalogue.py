"""A living catalogue: a loaded bundle plus its write-ahead item log (docs/design.md#item-writes).

Item rows come in with the item table's schema — the id, the item tower's feature columns, the
filterable attributes, the display columns — and optionally a vector. :func:`check_items`
validates them one by one (per-item errors by id: a bad item never stops the good ones);
:meth:`Catalogue.encode` gives each a vector from its features with the bundle's item tower (an
id the model never saw takes the unknown row: a cold item). A write is appended to the log and
fsynced (:class:`csmf.item_log.ItemLog`), then applied: the item table grows first (ids,
display, attributes), then the index, so a search never returns a row the table lacks; a delete
reaches the index first. Replaying the log onto the bundle at start, on reload and after another
process wrote gives every process the same rows in the same order (rows follow the log).

An upsert replaces the whole item: attributes and display columns it omits become null.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csmf.bundle import Bundle
from csmf.errors import ItemWriteError
from csmf.index.base import TOMBSTONE_LIMIT
from csmf.item_log import ItemLog, ItemLogError, Record, encode_payload

log = logging.getLogger("csmf.catalogue")
MAX_ITEM_ID = 512  # characters


def log_path(bundle: Bundle) -> Path:
    """The bundle's item log: from its manifest, else ``../<bundle name>.items.log``."""
    spec = bundle.manifest.items_log
    if spec is None:
        return bundle.path.parent / f"{bundle.path.name}.items.log"
    return Path(os.path.normpath(bundle.path / spec.file))


@dataclass
class Checked:
    """Items that passed :func:`check_items`, and the errors of the others by id."""

    ids: list[str]
    rows: list[dict[str, Any]]  # the items as given (id + feature / attribute / display columns)
    vectors: np.ndarray | None  # (n, D) when every item gave one, else None (encode them)
    given: np.ndarray  # (n,) bool: the item gave a vector
    errors: dict[str, str]


class Catalogue:
    """The bundle being served and its item log; writes from any thread (one at a time)."""

    def __init__(self, bundle: Bundle, log: ItemLog | None = None) -> None:
        self.bundle = bundle
        self.log = log or ItemLog(log_path(bundle))
        spec = bundle.manifest.items_log
        self.folded = spec.applied_seq if spec is not None else 0  # in the bundle's files
        self.seq = self.folded  # last record applied
        self.offset = 0  # where reading resumes (0 = scan from the start, skipping <= seq)
        self.ino = 0  # the log file (inode) ``offset`` belongs to: a truncation replaces it
        self.lock = threading.RLock()  # apply one record at a time, in log order
        self.listeners: list[Callable[[np.ndarray], None]] = []  # called with written rows
        self.skipped = 0  # items of records for another model whose given vectors were skipped
        n = len(bundle.item_ids)
        if bundle.dead is None:
            bundle.dead = np.zeros(n, bool)
        id_col = bundle.manifest.item_id_column
        enc = bundle.item_encoder
        self.features = {} if enc is None else {f.name: f.kind for f in enc.spec.fields}
        self.id_columns = {"item_id", id_col} | ({enc.spec.id_column} if enc else set())
        self.attributes = {a.name: a.type for a in bundle.manifest.attributes}
        self.display = list(bundle.item_meta)
        self.columns = set(self.features) | set(self.attributes) | set(self.display)

    # -- state ------------------------------------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """(seq, byte offset) of the last record applied."""
        return self.seq, self.offset

    def log_moved(self) -> bool:
        """The log grew, or was truncated (a new file), since the last record applied."""
        return self.log.position() != (self.ino, self.offset)

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.bundle.dead)

    def info(self) -> dict[str, Any]:
        """For ``GET /admin/bundle``: the log, how far it is applied, what compaction would
        drop, and (HNSW) whether the tombstones passed the manifest's limit."""
        index = self.bundle.index
        share = getattr(index, "tombstone_share", lambda: 0.0)()
        limit = self.bundle.manifest.index.tombstone_limit
        limit = TOMBSTONE_LIMIT if limit is None else limit
        return {
            "file": str(self.log.path),
            "applied_seq": self.seq,
            "folded_seq": self.folded,
            "log_base": self.log.base(),
            "log_bytes": self.log.size(),
            "rows": int(len(self.bundle.item_ids)),
            "deleted": int(np.count_nonzero(self.bundle.dead)),
            "writes": index.capabilities.writes,
            "tombstone_share": round(share, 4),
            "tombstone_limit": limit,
            "compaction_due": share > limit,
            "skipped_other_model": self.skipped,
        }

    # -- reading the log --------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Apply the records other writers (or a previous run) appended; returns how many."""
        with self.lock:
            count = 0
            for rec in self.log.read(self.offset, self.seq, self.ino):
                self.apply(rec)
                count += 1
            return count

    # -- writing ----------------------------------------------------------------------------------

    def upsert(self, checked: Checked) -> Record | None:
        """Log (durably) then apply the checked items; None if there were none."""
        if not checked.ids:
            return None
        vectors = self.encode(checked)
        names = dict.fromkeys(c for r in checked.rows for c in r)  # features too: re-encodable
        columns = {c: [r.get(c) for r in checked.rows] for c in names}
        model = self.bundle.model_version
        given = checked.given.tolist()
        return self._write(
            encode_payload("upsert", checked.ids, vectors, columns, model=model, given=given)
        )

    def delete(self, ids: Sequence[str]) -> Record | None:
        if not ids:
            return None
        return self._write(encode_payload("delete", list(ids)))

    def _write(self, payload: bytes) -> Record:
        caps = self.bundle.index.capabilities
        if caps.writes == "none":  # refused before the log: a record must always apply
            raise ItemWriteError(
                f"the {caps.backend} {caps.kind} index of bundle {self.bundle.path} takes no "
                "item writes; rebuild the bundle with another index type to write items"
            )
        with self.lock:
            rec = self.log.append(payload, (self.offset, self.seq, self.ino))  # fsynced: durable
            self.catch_up()  # records others appended before ours, then ours
            return rec

    def encode(self, checked: Checked) -> np.ndarray:
        """(n, D) vectors: the given ones, the others from their features (item tower)."""
        d = self.bundle.dim
        out = np.zeros((len(checked.ids), d), np.float32)
        if checked.vectors is not None:
            out[checked.given] = checked.vectors[checked.given]
        todo = np.flatnonzero(~checked.given)
        if len(todo):
            enc = self.bundle.item_encoder
            id_col = enc.spec.id_column
            rows = [{**checked.rows[i], id_col: checked.ids[i]} for i in todo]
            out[todo] = enc.encode(rows)
        return out

    # -- applying ---------------------------------------------------------------------------------

    def apply(self, rec: Record) -> None:
        with self.lock:
            if rec.seq <= self.seq:  # folded into the bundle, or applied already
                if rec.ino != self.ino or rec.end > self.offset:
                    self.offset, self.ino = rec.end, rec.ino
                return
            if rec.op == "upsert":
                self._apply_upsert(rec)
            else:
                self._apply_delete(rec)
            self.seq, self.offset, self.ino = rec.seq, rec.end, rec.ino

    def _apply_upsert(self, rec: Record) -> None:
        b = self.bundle
        if rec.model is not None and rec.model != b.model_version:
            rec = self._reencode(rec)  # the bundle was rebuilt with another model since
            if not rec.ids:
                return
        if rec.vectors is None or rec.vectors.shape[1] != b.dim:
            got = None if rec.vectors is None else rec.vectors.shape[1]
            raise ItemLogError(
                f"item log {self.log.path}: record {rec.seq} at byte {rec.offset} holds vectors "
                f"of dimension {got}, bundle {b.path} has {b.dim} (a log of another bundle?)"
            )
        rows_of = b.item_rows
        n = len(b.item_ids)
        rows = np.empty(len(rec.ids), np.int64)
        new_ids = []
        for i, iid in enumerate(rec.ids):
            r = rows_of.get(iid)
            if r is None:
                r = n + len(new_ids)
                new_ids.append(iid)
            rows[i] = r
        # the item table first (ids, display, attributes), so any row a search returns exists
        if new_ids:
            b.item_ids = np.concatenate([b.item_ids, np.array(new_ids, dtype=object)])
            b.dead = np.concatenate([b.dead, np.zeros(len(new_ids), bool)])
        for c, col in b.item_meta.items():
            vals = rec.columns.get(c)
            col.extend([None] * (len(b.item_ids) - len(col)))
            for i, r in enumerate(rows.tolist()):
                col[r] = None if vals is None else vals[i]
        attrs = {a: rec.columns[a] for a in self.attributes if a in rec.columns}
        b.attributes = b.attributes.with_rows(rows, attrs)
        for iid, r in zip(rec.ids, rows.tolist(), strict=True):
            rows_of[iid] = r
        for fn in self.listeners:
            fn(rows)
        none = [None] * len(rows)
        raw = {a: np.asarray(rec.columns.get(a, none), object) for a in self.attributes}
        b.index.upsert(rows, rec.vectors, raw)
        b.dead[rows] = False

    def _reencode(self, rec: Record) -> Record:
        """A record written for another model: its items encoded from their features get this
        bundle's item tower; items whose vector was given (that model's space) are skipped,
        with a warning — their writer must send them again for this model."""
        b = self.bundle
        given = rec.given or [True] * len(rec.ids)
        keep = [i for i, g in enumerate(given) if not g and b.item_encoder is not None]
        dropped = [rec.ids[i] for i in range(len(rec.ids)) if i not in set(keep)]
        if dropped:
            self.skipped += len(dropped)
            log.warning(
                "item log %s: record %d was written for model %s, this bundle serves %s: "
                "%d item(s) whose vector was given are skipped (send them again): %s",
                self.log.path, rec.seq, rec.model, b.model_version, len(dropped), dropped[:5],
            )  # fmt: skip
        ids = [rec.ids[i] for i in keep]
        cols = {c: [v[i] for i in keep] for c, v in rec.columns.items()}
        vectors = None
        if keep:
            id_col = b.item_encoder.spec.id_column
            rows = [{**{c: cols[c][j] for c in cols}, id_col: ids[j]} for j in range(len(ids))]
            vectors = b.item_encoder.encode(rows)
        out = Record(rec.seq, rec.op, ids, vectors, cols, rec.offset, rec.end)
        out.model = b.model_version
        return out

    def _apply_delete(self, rec: Record) -> None:
        b = self.bundle
        rows = [b.item_rows.get(i) for i in rec.ids]
        rows = np.asarray(sorted({r for r in rows if r is not None}), np.int64)
        rows = rows[~b.dead[rows]] if len(rows) else rows
        if len(rows) == 0:
            return
        b.index.delete(rows)  # the index first: from here no search returns them
        b.dead[rows] = True
        for fn in self.listeners:
            fn(rows)


# -- checking item rows ---------------------------------------------------------------------------


def check_items(cat: Catalogue, items: Sequence[Any], max_items: int) -> Checked:
    """Validate item rows (the item table's schema, optionally ``vector``): per-item errors by
    id (or by position when the id itself is bad). Raises ValueError for a batch over
    ``max_items``."""
    if len(items) > max_items:
        raise ValueError(f"items: at most {max_items} items per write, got {len(items)}")
    ids: list[str] = []
    rows: list[dict[str, Any]] = []
    vecs: list[np.ndarray | None] = []
    errors: dict[str, str] = {}
    seen: set[str] = set()
    d = cat.bundle.dim
    for pos, item in enumerate(items):
        key = f"items[{pos}]"
        if not isinstance(item, Mapping):
            errors[key] = f"an item must be an object, got {type(item).__name__}"
            continue
        iid, err = _item_id(item, cat.id_columns)
        if err:
            errors[key] = err
            continue
        if iid in seen:
            errors[iid] = "the same id appears twice in one write"
            continue
        seen.add(iid)
        err = _check_columns(item, cat)
        vector = None
        if err is None and item.get("vector") is not None:
            vector, err = _vector(item["vector"], d)
        if err is None and vector is None and cat.bundle.item_encoder is None:
            err = "this bundle has no item encoder (built before item writes): give `vector`"
        if err:
            errors[iid] = err
            continue
        ids.append(iid)
        rows.append({k: v for k, v in item.items() if k in cat.columns})
        vecs.append(vector)
    given = np.array([v is not None for v in vecs], bool)
    vectors = None
    if given.any():
        vectors = np.zeros((len(ids), d), np.float32)
        for i, v in enumerate(vecs):
            if v is not None:
                vectors[i] = v
    return Checked(ids, rows, vectors, given, errors)


def check_ids(ids: Iterable[Any], max_items: int) -> tuple[list[str], dict[str, str]]:
    """Ids of a delete: strings, at most ``max_items``; (valid ids deduplicated, errors)."""
    ids = list(ids)
    if len(ids) > max_items:
        raise ValueError(f"ids: at most {max_items} ids per delete, got {len(ids)}")
    out, errors, seen = [], {}, set()
    for pos, i in enumerate(ids):
        if not isinstance(i, str) or not i or len(i) > MAX_ITEM_ID:
            errors[f"ids[{pos}]"] = f"an item id must be a non-empty string, got {_show(i)}"
        elif i not in seen:
            seen.add(i)
            out.append(i)
    return out, errors


def _item_id(item: Mapping[str, Any], id_columns: set[str]) -> tuple[str, str | None]:
    present = [c for c in id_columns if c in item]
    if not present:
        return "", f"missing the item id (`{sorted(id_columns)[0]}`)"
    values = {item[c] for c in present if isinstance(item[c], str)}
    iid = item[present[0]]
    if not isinstance(iid, str) or not iid or len(iid) > MAX_ITEM_ID:
        return "", f"an item id must be a non-empty string, got {_show(iid)}"
    if len(values) > 1:
        return "", f"the id columns {present} disagree"
    return iid, None


def _check_columns(item: Mapping[str, Any], cat: Catalogue) -> str | None:
    for name, value in item.items():
        if name in cat.id_columns or name == "vector":
            continue
        if name not in cat.columns:
            known = sorted(cat.columns)
            return f"unknown column {name!r}; the item table has {known}"
        if value is None:
            continue
        kind = cat.attributes.get(name) or cat.features.get(name)
        err = _check_value(name, value, kind)
        if err:
            return err
    return None


def _check_value(name: str, v: Any, kind: str | None) -> str | None:
    if kind == "number" or kind == "numeric":
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"{name!r} must be a number, got {_show(v)}"
        if not math.isfinite(v):
            return f"{name!r} must be a finite number, got {_show(v)}"
    elif kind == "bool":
        if not isinstance(v, bool):
            return f"{name!r} must be true or false, got {_show(v)}"
    elif kind in ("string", "categorical"):
        if not isinstance(v, str | int) or isinstance(v, bool):
            return f"{name!r} must be a string, got {_show(v)}"
    elif kind == "multi_hot":
        if not isinstance(v, list) or not all(isinstance(x, str | int) for x in v):
            return f"{name!r} must be a list of strings, got {_show(v)}"
    elif kind is None and not isinstance(v, str | int | float | bool):  # display: scalars only
        return f"{name!r} must be a string, number or boolean, got {_show(v)}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{name!r} must be a finite number, got {_show(v)}"
    return None


def _vector(v: Any, d: int) -> tuple[np.ndarray | None, str | None]:
    if not isinstance(v, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in v
    ):
        return None, f"`vector` must be a list of {d} numbers"
    if len(v) != d:
        return None, f"`vector` must have {d} values (the bundle's dimension), got {len(v)}"
    a = np.asarray(v, np.float32)
    if not np.isfinite(a).all():
        return None, "`vector` has a NaN or infinite value"
    return a, None


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
