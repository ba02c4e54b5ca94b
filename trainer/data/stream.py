"""Out-of-core training data (docs/design.md#training-at-scale): events stay in Parquet row
groups and are read chunk by chunk, so a process's memory does not grow with the number of events.

Preparation makes a few passes over the ``user_id``/``timestamp`` (and label) columns, keeping
only per-user and per-item arrays:

1. **scan**: validate every chunk (the in-memory loader's checks, chunk by chunk), map ids to
   vocabulary rows (the vocabularies come from ``users.parquet`` / ``items.parquet``, which are
   per-entity, not per-event) and count events per user.
2. **cut-offs**: the per-user time split (:mod:`csmf.split`) labels the last
   ``n_test`` of a user's events in (timestamp, row) order as test and the ``n_val`` before them
   as validation. With per-user counts known, that is one order statistic per user: the
   (timestamp, row) key of the user's first validation and first test event. Users are split
   into ``B`` buckets (user row mod B) so that one bucket's (user, timestamp, row) triples fit a
   fixed budget; one pass per bucket sorts them and records the two keys. Labels are then a
   comparison against the user's keys — exactly :func:`csmf.split.split_labels`.
3. **stats**: per-item train-positive counts per objective (log-Q / ``item_prob``), per-rank
   example counts, the history table (if the feature spec has one: the train events' items, the
   one structure that is O(train events), 16 B each) and a validation sample (every event of the
   first ``eval.val_users`` users that have validation events; 2,000 when unset).

Training (:class:`StreamExamples`) reads a stage's train positives per epoch: row groups in a
seeded shuffled order, through a bounded shuffle buffer (``train.shuffle_buffer`` examples). Under
torchrun rank r reads row groups r, r + world, ... (with fewer than 2 × world row groups every
rank reads each group and keeps every world-th chunk); every rank runs the same number of steps
(the largest shard's), a rank whose shard is exhausted contributes empty batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import csmf.objectives as funnel
from csmf.errors import ConfigError, DataError
from csmf.features import FeatureSpec, TowerVocab
from csmf.split import TEST, TRAIN, VALIDATION, split_counts
from trainer.data.dataset import (
    LOG_MARKER,
    Dataset,
    Split,
    _cast_integer,
    _check_entities,
    _check_events,
    _check_features,
    _fmt,
    _no_nulls,
    _normalise_id,
    _one_line,
    _read_meta,
    _read_parquet,
    check_positives,
    label_count,
    warn_skipped,
)
from trainer.encoding import (
    Candidates,
    Encoded,
    Events,
    History,
    PageViews,
    StageExamples,
    StepBatch,
    encode_table,
    fit_vocabs,
)

CHUNK_ROWS = 65_536  # rows decoded at a time
SKIPPED = 3  # split label of an event-log row that cannot train (no user, unknown user or item)
CUTOFF_BUDGET = 4_000_000  # (user, timestamp, row) triples sorted at once while finding cut-offs
DEFAULT_VAL_USERS = 2_000
_INF = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Part:
    """One Parquet row group of the events, ``offset`` = global row index of its first row."""

    path: Path
    group: int
    rows: int
    offset: int


def event_parts(root: str | Path) -> tuple[list[Part], str]:
    """The events' row groups in dataset order (the in-memory loader's row order)."""
    root = Path(root)
    single, folder = root / "events.parquet", root / "events"
    if single.exists() and folder.exists():
        raise DataError(f"{root}: both events.parquet and events/ exist; keep exactly one of them")
    if single.exists():
        files, name = [single], "events.parquet"
    elif folder.is_dir():
        files, name = sorted(folder.glob("part-*.parquet")), "events/"
        if not files:
            raise DataError(f"{folder}: no part-*.parquet files in the events/ folder")
    else:
        raise DataError(f"{root}: missing events (expected events.parquet or an events/ folder)")
    parts, offset = [], 0
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{f}: not a readable parquet file ({_one_line(exc)})") from None
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            parts.append(Part(f, g, n, offset))
            offset += n
    return parts, name


def count_events(root: str | Path) -> int:
    """Number of events, from the Parquet footers only."""
    parts, _ = event_parts(root)
    return sum(p.rows for p in parts)


class IdLookup:
    """Raw ids → vocabulary rows, built once (the in-memory path's ``rows_of`` rebuilds a hash
    set per call). Integer ids use a sorted array; string ids arrow's ``index_in``."""

    def __init__(self, vocab: TowerVocab, entity: str, table: str) -> None:
        self.vocab = vocab.ids
        self.entity, self.table = entity, table
        self.keys = None
        values = vocab.ids.arrow_values()
        try:  # integer ids whose decimal string is the vocabulary's: a sorted int64 array
            keys = pc.cast(values, pa.int64())
            if pc.all(pc.equal(pc.cast(keys, pa.string()), values)).as_py() is not False:
                keys = np.asarray(keys.to_numpy(zero_copy_only=False), np.int64)
                order = np.argsort(keys, kind="stable")
                self.order = order.astype(np.int32) if len(order) < 2**31 else order
                self.keys = keys[self.order]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass

    def known(self, ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(rows, known): unknown or null ids get row 0 and ``known`` False (event logs)."""
        valid = ~np.asarray(ids.is_null().to_numpy(zero_copy_only=False), bool)
        if pa.types.is_integer(ids.type) and self.keys is not None and len(self.keys):
            raw = np.asarray(ids.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
            pos = np.minimum(np.searchsorted(self.keys, raw), len(self.keys) - 1)
            ok = (self.keys[pos] == raw) & valid
            return np.where(ok, self.order[pos], 0).astype(np.int64), ok
        rows = self.vocab.encode_arrow(ids) - 2
        ok = (rows >= 0) & valid
        return np.where(ok, rows, 0), ok

    def __call__(self, ids: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
        if pa.types.is_integer(ids.type) and self.keys is not None and len(self.keys):
            raw = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
            pos = np.minimum(np.searchsorted(self.keys, raw), len(self.keys) - 1)
            ok = self.keys[pos] == raw
            rows = self.order[pos].astype(np.int64)
        else:
            rows = self.vocab.encode_arrow(ids) - 2  # -1: unknown
            ok = rows >= 0
            rows = np.maximum(rows, 0)
        if not ok.all():
            bad = pc.unique(pc.filter(ids, pa.array(~ok)))
            raise DataError(
                f"{where}: {int((~ok).sum())} rows have {self.entity} not in {self.table} "
                f"(e.g. {_fmt(bad)})"
            )
        return rows


@dataclass
class Cutoffs:
    """Per user (row): the (timestamp, row) key of the first validation and first test event;
    int64 max when the user has none. An event at or after a key carries that label."""

    val_ts: np.ndarray
    val_row: np.ndarray
    test_ts: np.ndarray
    test_row: np.ndarray

    def labels(self, user: np.ndarray, ts: np.ndarray, row: np.ndarray) -> np.ndarray:
        def at_or_after(cut_ts: np.ndarray, cut_row: np.ndarray) -> np.ndarray:
            c = cut_ts[user]
            return (ts > c) | ((ts == c) & (row >= cut_row[user]))

        out = np.full(len(user), TRAIN, np.int8)
        out[at_or_after(self.val_ts, self.val_row)] = VALIDATION
        out[at_or_after(self.test_ts, self.test_row)] = TEST
        return out


def split_cutoffs(
    chunks,  # () -> iterator of (global row offset, user rows, timestamps, rows kept or None)
    per_user: np.ndarray,
    val_frac: float,
    test_frac: float,
    min_events: int,
    budget: int = CUTOFF_BUDGET,
) -> Cutoffs:
    """The per-user split as cut-off keys, in ``ceil(events / budget)`` passes over ``chunks()``."""
    n_val, n_test = split_counts(per_user, val_frac, test_frac, min_events)
    n_users = len(per_user)
    # row numbers fit int32 below 2^31 events: half the memory of two per-user arrays
    n_rows = int(per_user.sum())
    row_type = np.int32 if n_rows < np.iinfo(np.int32).max else np.int64
    ts_cut = [np.full(n_users, _INF, np.int64) for _ in range(2)]
    row_cut = [np.full(n_users, np.iinfo(row_type).max, row_type) for _ in range(2)]
    cut = Cutoffs(ts_cut[0], row_cut[0], ts_cut[1], row_cut[1])
    buckets = max(1, math.ceil(int(per_user.sum()) / max(budget, 1)))
    for b in range(buckets):
        us, tss, rows = [], [], []
        for offset, user, ts, kept in chunks():
            keep = user % buckets == b if buckets > 1 else np.ones(len(user), bool)
            if kept is not None:
                keep &= kept
            us.append(user[keep])
            tss.append(ts[keep])
            rows.append((offset + np.arange(len(user), dtype=np.int64))[keep])
        if not us:
            continue
        u, t, r = np.concatenate(us), np.concatenate(tss), np.concatenate(rows)
        del us, tss, rows
        order = np.lexsort((r, t, u))
        u, t, r = u[order], t[order], r[order]
        users = np.flatnonzero((per_user > 0) & (np.arange(n_users) % buckets == b))
        start = np.searchsorted(u, users)
        for n_after, ts_out, row_out in (
            (n_val + n_test, cut.val_ts, cut.val_row),  # the first validation event
            (n_test, cut.test_ts, cut.test_row),  # the first test event
        ):
            has = n_after[users] > 0
            pos = start[has] + per_user[users[has]] - n_after[users[has]]
            ts_out[users[has]] = t[pos]
            row_out[users[has]] = r[pos]
    return cut


def _hash_unit(row: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) value per (row, seed) (splitmix64), the same on every rank and epoch."""
    with np.errstate(over="ignore"):
        z = row.astype(np.uint64) + np.uint64(seed % (1 << 63)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class Chunk:
    """Decoded, validated events of one chunk (arrays in row order)."""

    offset: int
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray
    request: np.ndarray  # candidate-request code, -1 when none
    label: np.ndarray | None = None  # TRAIN / VALIDATION / TEST, or SKIPPED
    keep: np.ndarray | None = None  # event log: the rows that can train (None: every row)

    @property
    def row(self) -> np.ndarray:
        return self.offset + np.arange(len(self.user), dtype=np.int64)

    def positive(self, objective: str) -> np.ndarray:
        labels = {c: getattr(self, c) for c in funnel.LABEL_COLUMNS}
        return funnel.get(objective).positive(labels, len(self.user))


@dataclass
class StreamSource:
    """A dataset folder read out of core; built by :func:`open_stream`."""

    root: Path
    events_name: str
    parts: list[Part]
    users: IdLookup
    items: IdLookup
    n_users: int
    n_items: int
    request_ids: np.ndarray | None  # sorted candidate request ids (codes = positions)
    cutoffs: Cutoffs | None = None
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 262_144
    cache_examples: int = 0  # a stage with at most this many examples per rank is held in memory
    is_log: bool = False  # the service's event log: rows that cannot train are skipped
    held: dict[str, list[np.ndarray]] = field(default_factory=dict)  # objective → examples
    history_source: str | None = None
    history: History | None = None
    item_counts: dict[str, np.ndarray] = field(default_factory=dict)  # train positives per item
    rank_counts: dict[str, list[int]] = field(default_factory=dict)  # train positives per rank
    split_sizes: tuple[int, int, int] = (0, 0, 0)
    dist: object | None = None  # trainer.distributed.Dist (gathers subset counts)

    # ------------------------------------------------------------------ reading

    @property
    def striped(self) -> bool:
        """Too few row groups to give each rank its own: stripe chunks within every group."""
        return self.world > 1 and len(self.parts) < 2 * self.world

    def owner(self, part: int, chunk: int) -> int:
        return (chunk if self.striped else part) % self.world

    def read(self, part_ids, columns: tuple[str, ...] = (), rank: int | None = None):
        """Chunks of the given parts (in that order); only ``rank``'s chunks if given."""
        if self.is_log and columns:  # which rows can train needs the item and the marker
            columns = tuple(dict.fromkeys((*columns, "item_id", LOG_MARKER)))
        for i in part_ids:
            p = self.parts[i]
            if rank is not None and not self.striped and i % self.world != rank:
                continue
            for c, (offset, table) in enumerate(_read_part(p, columns)):
                if rank is not None and self.striped and c % self.world != rank:
                    continue
                yield i, c, self._decode(offset, table, columns)

    def _decode(self, offset: int, table: pa.Table, columns: tuple[str, ...]) -> Chunk:
        n = table.num_rows
        keep = None
        if self.is_log:  # rows that cannot train keep their row number, labelled SKIPPED
            user, keep = self.users.known(table["user_id"])
            keep &= ~_cold(table)
            item, known = self.items.known(table["item_id"])
            keep &= known
        else:
            user = self.users(table["user_id"], self.events_name)
            item = (
                self.items(table["item_id"], self.events_name)
                if "item_id" in columns
                else np.zeros(n, np.int64)
            )
        ts = table["timestamp"].to_numpy().astype(np.int64, copy=False)
        labels = {c: _bools(table, c, n) for c in funnel.LABEL_COLUMNS}
        request = np.full(n, -1, np.int64)
        if self.request_ids is not None and "request_id" in table.column_names:
            raw = table["request_id"].to_numpy(zero_copy_only=False)
            raw = np.where(np.isnan(raw.astype(np.float64)), -1, raw).astype(np.int64)
            pos = np.minimum(np.searchsorted(self.request_ids, raw), len(self.request_ids) - 1)
            request = np.where(self.request_ids[pos] == raw, pos, -1)
        chunk = Chunk(offset, user, item, ts, request=request, **labels)
        if self.cutoffs is not None:
            chunk.label = self.cutoffs.labels(user, ts, chunk.row)
            if keep is not None:
                chunk.label[~keep] = SKIPPED
        chunk.keep = keep
        return chunk

    def labels(self) -> np.ndarray:
        """Every event's split label in dataset order (tests compare it with the in-memory split)."""
        cols = ("user_id", "timestamp")
        return np.concatenate([c.label for _, _, c in self.read(range(len(self.parts)), cols)])

    # ------------------------------------------------------------------ training examples

    def examples(self, objective: str, item_prob: torch.Tensor | None = None) -> StreamExamples:
        counts = self.item_counts[objective].astype(np.float64)
        if counts.sum() == 0:
            raise DataError(f"no {objective} positives in the train split")
        prob = torch.as_tensor(counts / counts.sum(), dtype=torch.float32)
        cache = self.held.get(objective)
        return StreamExamples(self, objective, prob, list(self.rank_counts[objective]), cache=cache)


class StreamExamples:
    """A stage's train positives, streamed: the out-of-core :class:`trainer.encoding.Examples`."""

    def __init__(
        self,
        src: StreamSource,
        objective: str,
        item_prob: torch.Tensor,
        rank_counts: list[int],
        keep: tuple[float, int] | None = None,
        cache: list[np.ndarray] | None = None,
    ) -> None:
        self.src, self.objective, self.item_prob = src, objective, item_prob
        self.rank_counts, self.keep = rank_counts, keep
        self._cache = cache  # this rank's examples (user, item, ts, request, row), if held

    def __len__(self) -> int:
        return int(sum(self.rank_counts))

    def steps(self, batch_size: int, world: int = 1) -> int:
        """Steps per epoch on every rank: the largest shard's (``world`` is in the shards)."""
        return max((c + batch_size - 1) // batch_size for c in self.rank_counts)

    def draw_subset(self, frac: float, rng: np.random.Generator) -> np.ndarray:
        """Accuracy recovery's subset token: ``[hash seed]`` (see :meth:`subset`)."""
        return np.array([rng.integers(1 << 62)])

    def take(self, token: np.ndarray, frac: float) -> StreamExamples:
        return self.subset(frac, int(token[0]))

    def subset(self, frac: float, seed: int) -> StreamExamples:
        """Each example kept with probability ``frac`` by a hash of its row and ``seed``
        (accuracy recovery's rho subset); counts every rank's share in one pass."""
        sub = StreamExamples(self.src, self.objective, self.item_prob, [], (frac, seed))
        if self._cache is not None:  # filter the held examples: no pass over the Parquet
            keep = _hash_unit(self._cache[4], seed) < frac
            sub._cache = [a[keep] for a in self._cache]
            mine = int(keep.sum())
        else:
            mine = sum(len(x[0]) for x in sub._own_examples(range(len(self.src.parts))))
        dist = self.src.dist
        sub.rank_counts = (
            [int(c) for c in dist.gather_objects(mine)] if dist is not None else [mine]
        )
        return sub

    def _own_examples(self, part_ids) -> Iterator[tuple[np.ndarray, ...]]:
        src = self.src
        cols = ["user_id", "item_id", "timestamp"]
        label = funnel.get(self.objective).column
        if label is not None:
            cols.append(label)
        if src.request_ids is not None:
            cols.append("request_id")
        for _, _, c in src.read(part_ids, tuple(cols), rank=src.rank):
            sel = (c.label == TRAIN) & c.positive(self.objective)
            if self.keep is not None:
                sel &= _hash_unit(c.row, self.keep[1]) < self.keep[0]
            if sel.any():
                yield c.user[sel], c.item[sel], c.ts[sel], c.request[sel], c.row[sel]

    def held(self) -> list[np.ndarray] | None:
        """This rank's examples (user, item, ts, request, row) if the preparation pass collected
        them (every rank has at most ``train.cache_examples``), else None: streamed each epoch.
        A click or conversion stage is a tenth or a hundredth of the events: streaming it
        re-reads every event per epoch to find them."""
        return self._cache

    def batches(
        self, rng: np.random.Generator, batch_size: int, rank: int = 0, world: int = 1
    ) -> Iterator[StepBatch]:
        """One epoch: this rank's batch per step, ``steps`` of them. ``rng`` is the shared
        batch-order generator (same draws on every rank), drawn from now, not while iterating;
        the source knows its rank."""
        order = rng.permutation(len(self.src.parts))
        buf_seed = int(rng.integers(1 << 62))
        n_global = batch_size * world
        held = self.held()
        epoch = (
            self._epoch(order, buf_seed, batch_size)
            if held is None
            else self._held_epoch(held, buf_seed, batch_size)
        )
        return (StepBatch(b, np.arange(len(b)), n_global) for b in epoch)

    def _emit(self, arrays: list[np.ndarray], n: int) -> StageExamples:
        user, item, ts, request = (a[:n] for a in arrays[:4])
        history = self.src.history
        hist_end = history.before(user, ts) if history is not None else np.zeros_like(user)
        return StageExamples(user, item, hist_end, request, self.item_prob)

    def _held_epoch(
        self, held: list[np.ndarray], buf_seed: int, batch_size: int
    ) -> Iterator[StageExamples]:
        perm = np.random.default_rng([buf_seed, self.src.rank]).permutation(len(held[0]))
        done = 0
        for lo in range(0, len(perm), batch_size):
            yield self._emit([a[perm[lo : lo + batch_size]] for a in held[:4]], batch_size)
            done += 1
        yield from self._pad(done, batch_size)

    def _pad(self, done: int, batch_size: int) -> Iterator[StageExamples]:
        empty = np.zeros(0, np.int64)
        for _ in range(done, self.steps(batch_size)):  # other ranks still have batches
            yield StageExamples(empty, empty, empty, empty, self.item_prob)

    def _epoch(self, order: np.ndarray, buf_seed: int, batch_size: int) -> Iterator[StageExamples]:
        src = self.src
        buf_rng = np.random.default_rng([buf_seed, src.rank])
        cap = max(src.shuffle_buffer, batch_size)
        done = 0
        emit = self._emit
        buf: list[np.ndarray] | None = None
        for arrays in self._own_examples(order):
            buf = (
                list(arrays)
                if buf is None
                else [np.concatenate(x) for x in zip(buf, arrays, strict=True)]
            )
            if len(buf[0]) >= cap + CHUNK_ROWS // 2:
                perm = buf_rng.permutation(len(buf[0]))
                buf = [a[perm] for a in buf]
                n_out = (len(buf[0]) - cap // 2) // batch_size * batch_size
                for lo in range(0, n_out, batch_size):
                    yield emit([a[lo:] for a in buf], batch_size)
                    done += 1
                buf = [a[n_out:].copy() for a in buf]
        if buf is not None and len(buf[0]):
            perm = buf_rng.permutation(len(buf[0]))
            buf = [a[perm] for a in buf]
            for lo in range(0, len(buf[0]), batch_size):
                yield emit([a[lo:] for a in buf], min(batch_size, len(buf[0]) - lo))
                done += 1
        yield from self._pad(done, batch_size)


def _read_part(p: Part, columns: tuple[str, ...]) -> Iterator[tuple[int, pa.Table]]:
    try:
        pf = pq.ParquetFile(p.path)
        names = pf.schema_arrow.names
        cols = [c for c in columns if c in names] if columns else None
        offset = p.offset
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=[p.group], columns=cols):
            yield offset, pa.Table.from_batches([batch])
            offset += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{p.path}: not a readable parquet file ({_one_line(exc)})") from None


def _bools(table: pa.Table, col: str, n: int) -> np.ndarray:
    if col not in table.column_names:
        return np.zeros(n, bool)
    return table[col].to_numpy(zero_copy_only=False).astype(bool)


# --------------------------------------------------------------------------- opening


def open_stream(
    root: str | Path,
    spec: FeatureSpec,
    objectives,
    split: dict,
    *,
    vocabs: tuple[TowerVocab, TowerVocab] | None = None,
    rank: int = 0,
    world: int = 1,
    shuffle_buffer: int = 262_144,
    cache_examples: int = 0,
    val_users: int = 0,
    dist=None,
    budget: int = CUTOFF_BUDGET,
) -> StreamedEncoded:
    """Validate, split and summarise ``root`` out of core; ``events``/``split`` of the result
    hold the validation sample and its ``stream`` is the source."""
    root = Path(root)
    if split.get("test_from"):
        raise ConfigError(
            "split.test_from (the global time split) needs train.data = 'memory'; the streamed "
            "path splits per user"
        )
    split = {k: v for k, v in split.items() if k != "test_from"}
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist (or is not a folder)")
    parts, events_name = event_parts(root)
    if not parts:
        raise DataError(f"{root}: the events have no row groups")
    users = _read_parquet(root / "users.parquet")
    items = _read_parquet(root / "items.parquet")
    # the entity checks compare id types with the events': an empty, normalised events table
    proto = _check_events(pq.ParquetFile(parts[0].path).schema_arrow.empty_table(), events_name, ())
    users = _check_entities(users, "users.parquet", "user_id", proto, events_name)
    items = _check_entities(items, "items.parquet", "item_id", proto, events_name)
    _check_features(users, "users.parquet", spec.user)
    _check_features(items, "items.parquet", spec.item)
    ds = Dataset(root, proto, users, items, None, _read_meta(root))
    user_vocab, item_vocab = vocabs if vocabs is not None else fit_vocabs(ds, spec)
    candidates, request_ids = _stream_candidates(root, items, item_vocab)
    is_log = LOG_MARKER in proto.column_names
    src = StreamSource(
        root, events_name, parts,
        IdLookup(user_vocab, "user_id", "users.parquet"),
        IdLookup(item_vocab, "item_id", "items.parquet"),
        user_vocab.ids.size, item_vocab.ids.size, request_ids,
        rank=rank, world=world, shuffle_buffer=shuffle_buffer, cache_examples=cache_examples,
        is_log=is_log, dist=dist,
    )  # fmt: skip
    all_parts = range(len(parts))

    # pass 1: validate, count events per user and positives per objective
    per_user = np.zeros(src.n_users, np.int64)
    n_events = 0
    positives = dict.fromkeys(funnel.NAMES, 0)
    skipped: dict[str, int] = {}
    for i in all_parts:
        for offset, table in _read_part(parts[i], ()):
            where = (
                f"{events_name} ({parts[i].path.name}, rows {offset}-{offset + table.num_rows - 1})"
            )
            if is_log:
                table = _trainable_rows(table, src, where, skipped)
            table = _check_chunk(table, where)
            user = src.users(table["user_id"], events_name)
            src.items(table["item_id"], events_name)
            per_user += np.bincount(user, minlength=src.n_users)
            n_events += table.num_rows
            for o in funnel.FUNNEL:
                positives[o.name] += label_count(table, o, table.num_rows)
    check_positives(events_name, positives, n_events, objectives)
    warn_skipped(root / events_name, skipped, n_events + sum(skipped.values()))

    # pass 2: the split's per-user cut-offs (one pass per bucket of users)
    def user_ts():
        for _, _, c in src.read(all_parts, ("user_id", "timestamp")):
            yield c.offset, c.user, c.ts, c.keep

    src.cutoffs = split_cutoffs(user_ts, per_user, budget=budget, **split)

    # pass 3: per-item/per-rank train-positive counts, history, validation sample
    n_val_users = val_users or DEFAULT_VAL_USERS
    has_val = np.flatnonzero(split_counts(per_user, **split)[0] > 0)
    sample = np.zeros(src.n_users, bool)
    sample[has_val[:n_val_users]] = True
    hist_src = spec.user.history.source if spec.user.history is not None else None
    counts = {o: np.zeros(src.n_items, np.int64) for o in objectives}
    ranks = {o: [0] * world for o in objectives}
    sizes = np.zeros(3, np.int64)
    hist: list[tuple[np.ndarray, ...]] = []
    samp: list[Chunk] = []
    # this rank's train positives of every objective, while they fit train.cache_examples: a
    # stage that fits is then trained from memory without another pass (StreamExamples.held)
    held: dict[str, list | None] = {o: [] if cache_examples else None for o in objectives}
    cols = ("user_id", "item_id", "timestamp", *funnel.LABEL_COLUMNS)
    cols += ("request_id",) if request_ids is not None else ()
    for i, c_idx, c in src.read(all_parts, cols):
        train = c.label == TRAIN
        sizes += np.bincount(c.label, minlength=SKIPPED + 1)[:3]
        r = src.owner(i, c_idx)
        for o in objectives:
            sel = train & c.positive(o)
            counts[o] += np.bincount(c.item[sel], minlength=src.n_items)
            ranks[o][r] += int(sel.sum())
            if r == rank and held[o] is not None and sel.any():
                held[o].append((c.user[sel], c.item[sel], c.ts[sel], c.request[sel], c.row[sel]))
                if ranks[o][r] > cache_examples:
                    held[o] = None
        if hist_src is not None:
            sel = train & c.positive(hist_src)
            hist.append((c.user[sel], c.item[sel], c.ts[sel]))
        keep = sample[c.user] & (c.label != SKIPPED)
        if keep.any():
            keys = ("user", "item", "ts", "request", *funnel.LABEL_COLUMNS)
            samp.append(Chunk(0, **{k: getattr(c, k)[keep] for k in keys}, label=c.label[keep]))
    src.item_counts, src.rank_counts = counts, ranks
    src.held = {
        o: [np.concatenate(a) for a in zip(*parts, strict=True)] if parts else None
        for o, parts in held.items()
        if parts is not None and max(ranks[o]) <= cache_examples
    }
    src.split_sizes = tuple(int(x) for x in sizes)
    history = None
    if spec.user.history is not None:
        h = [np.concatenate(x) for x in zip(*hist, strict=True)] or [np.zeros(0, np.int64)] * 3
        hist.clear()
        none = np.zeros(len(h[0]), bool)
        labels = dict.fromkeys(funnel.LABEL_COLUMNS, none)
        hev = Events(user=h[0], item=h[1], ts=h[2], request=h[0], **labels)
        history = History(hev, np.arange(len(h[0])), src.n_users, spec.user.history.max_len)
        del h, hev
    src.history, src.history_source = history, hist_src

    def cat(k: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(c, k) for c in samp]) if samp else np.zeros(0, dtype)

    label = cat("label", np.int8)
    events = Events(
        user=cat("user", np.int64), item=cat("item", np.int64), ts=cat("ts", np.int64),
        request=cat("request", np.int64), **{c: cat(c, bool) for c in funnel.LABEL_COLUMNS},
    )  # fmt: skip
    split_sample = Split(
        train=np.flatnonzero(label == TRAIN),
        val=np.flatnonzero(label == VALIDATION),
        test=np.flatnonzero(label == TEST),
    )
    enc = StreamedEncoded(
        spec=spec,
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        users=encode_table(users, spec.user, user_vocab),
        items=encode_table(items, spec.item, item_vocab),
        events=events,
        split=split_sample,
        history=history,
        candidates=candidates,
        stream=src,
    )
    return_freed_memory()
    return enc


@dataclass
class StreamedEncoded(Encoded):
    """A dataset read out of core (:func:`open_stream`): ``events``/``split`` hold only the
    validation sample; training examples, split sizes and item counts come from ``stream``."""

    stream: StreamSource = field(kw_only=True)

    def examples(
        self,
        objective: str,
        since: int | None = None,
        replay: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> StreamExamples:
        if since is not None:
            raise DataError("a warm start reads the dataset in memory (train.data = 'memory')")
        return self.stream.examples(objective)

    def page_views(self) -> PageViews:
        raise ConfigError(
            "loss.page_negatives needs the events in memory: the streamed path "
            "(train.data = 'stream') does not index page views; use train.data = 'memory' "
            "or loss.page_negatives = 0"
        )

    def split_sizes(self) -> tuple[int, int, int]:
        return self.stream.split_sizes

    def train_times(self) -> None:
        return None  # not held: a streamed run is not warm-started


def return_freed_memory() -> None:
    """Hand back to the OS what the passes freed: arrow's allocator (mimalloc, per-thread heaps)
    keeps it until asked, glibc's malloc until trimmed — 1.5-2 GB of RSS at 10M users that the
    training steps would otherwise carry on top of the model."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cold(table: pa.Table) -> np.ndarray:
    if LOG_MARKER not in table.column_names:
        return np.zeros(table.num_rows, bool)
    return np.asarray(table[LOG_MARKER].fill_null(False).to_numpy(zero_copy_only=False), bool)


def _trainable_rows(table: pa.Table, src: StreamSource, where: str, skipped: dict) -> pa.Table:
    """Event log, first pass: the rows that can train (the in-memory loader's rules, counted
    into ``skipped`` by reason); later passes mark the same rows SKIPPED by :meth:`_decode`."""
    no_user = np.asarray(table["user_id"].is_null().to_numpy(zero_copy_only=False), bool)
    cold = _cold(table) & ~no_user
    _, user_ok = src.users.known(table["user_id"])
    _, item_ok = src.items.known(table["item_id"])
    unknown_user = ~user_ok & ~no_user & ~cold
    unknown_item = ~item_ok & user_ok & ~cold
    for why, mask in (
        ("cold-start (unknown user)", cold),
        ("history-only (no user id)", no_user),
        ("user not in users.parquet", unknown_user),
        ("item not in items.parquet", unknown_item),
    ):
        if mask.any():
            skipped[why] = skipped.get(why, 0) + int(mask.sum())
    keep = ~(cold | no_user | unknown_user | unknown_item)
    return table if keep.all() else table.filter(pa.array(keep))


def _check_chunk(table: pa.Table, where: str) -> pa.Table:
    """The in-memory loader's per-row checks on one chunk (positives are counted globally)."""
    return _check_events(table, where, ())


def _stream_candidates(root: Path, items: pa.Table, item_vocab: TowerVocab):
    """``candidates.parquet`` (per request, not per event: read whole). Request codes are
    positions in its sorted unique request ids; events of other requests get none."""
    path = root / "candidates.parquet"
    if not path.exists():
        return None, None
    name = "candidates.parquet"
    cand = _read_parquet(path)
    for col in ("request_id", "item_id"):
        if col not in cand.column_names:
            raise DataError(f"{name}: missing required column(s) {col}")
    cand = _cast_integer(cand, name, "request_id")
    cand = _normalise_id(cand, name, "item_id")
    _no_nulls(cand, name, "request_id")
    if cand.num_rows == 0:
        return None, None
    lookup = IdLookup(item_vocab, "item_id", "items.parquet")
    item_rows = lookup(cand["item_id"], name)
    req = cand["request_id"].to_numpy().astype(np.int64)
    request_ids = np.unique(req)
    codes = np.searchsorted(request_ids, req)
    return Candidates(codes, item_rows, len(request_ids)), request_ids
