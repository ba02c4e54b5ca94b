"""From a Dataset to tensors: vocabularies, every user/item encoded once, per-stage examples and
per-batch inputs (user histories gathered on the fly).

Row conventions: user row ``r`` ↔ user-vocab index ``r + 2`` and item row ``r`` ↔ item-vocab index
``r + 2`` (0 = PAD, 1 = UNK), so the history table — an embedding over the item vocabulary —
takes ``item_row + 2`` directly.

User history for a training example is the user's train events strictly earlier than the
example's timestamp (the target itself and same-second events are never visible); for
evaluation it is all of the user's train events. Histories are stored once as per-user sorted
arrays (CSR); a batch gathers its ``(B, L)`` window from positions, so memory stays O(events).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

import csmf.objectives as funnel
from csmf.errors import DataError
from csmf.features import FeatureSpec, TowerSpec, TowerVocab, encode_rows, fit_tower_vocab
from trainer.data.dataset import Dataset, Split

OFFSET = 2  # vocab index of row 0


def fit_vocabs(ds: Dataset, spec: FeatureSpec) -> tuple[TowerVocab, TowerVocab]:
    """Vocabularies over the users and items tables (ids included)."""
    return (
        fit_tower_vocab(spec.user, tower_columns(ds.users, spec.user)),
        fit_tower_vocab(spec.item, tower_columns(ds.items, spec.item)),
    )


def tower_columns(table: pa.Table, spec: TowerSpec) -> dict[str, pa.ChunkedArray]:
    """The tower's columns as arrow arrays: vocabularies and encodings are vectorised over them
    (10M users as Python objects would cost GBs)."""
    names = [spec.id_column] + [f.name for f in spec.fields if f.name in table.column_names]
    return {n: table[n] for n in names}


def rows_of(ids: pa.ChunkedArray | pa.Array, vocab: TowerVocab, what: str) -> np.ndarray:
    """Raw ids → rows (vocab index - 2), vectorised; ids missing from the vocabulary are an error."""
    rows = vocab.ids.encode_arrow(ids) - OFFSET  # -1: not in the vocabulary
    missing = rows < 0
    if missing.any():
        bad = pc.filter(pc.cast(ids, pa.string()), pa.array(missing))[:3].to_pylist()
        raise DataError(f"{int(missing.sum())} {what} ids are not in the vocabulary (e.g. {bad})")
    return rows


def with_absent_rows(table: pa.Table, id_column: str, vocab: TowerVocab) -> tuple[pa.Table, int]:
    """``table`` plus a row of null features for every vocabulary id it no longer lists (they
    encode as unknown values; those entities keep their id rows and have no new events)."""
    known = vocab.ids.arrow_values()
    missing = pc.filter(
        known, pc.invert(pc.is_in(known, value_set=pc.cast(table[id_column], pa.string())))
    )
    if len(missing) == 0:
        return table, 0
    cols = [
        pc.cast(missing, f.type) if f.name == id_column else pa.nulls(len(missing), f.type)
        for f in table.schema
    ]
    extra = pa.Table.from_arrays(cols, schema=table.schema)
    return pa.concat_tables([table, extra]), len(missing)


def encode_table(table: pa.Table, spec: TowerSpec, vocab: TowerVocab) -> dict[str, Tensor]:
    """Encode every vocabulary entry's row of ``table``, in vocabulary order: (n_rows, ...) per
    input but the id, which is the row + OFFSET (added per batch)."""
    rows = rows_of(table[spec.id_column], vocab, spec.id_column)
    order = np.full(vocab.ids.size, -1, np.int64)
    order[rows] = np.arange(len(rows))
    if (order < 0).any():
        values = vocab.ids.values
        missing = [values[i] for i in np.flatnonzero(order < 0)[:3]]
        raise DataError(f"{spec.id_column}: vocabulary ids missing from the table (e.g. {missing})")
    cols = tower_columns(table.take(pa.array(order)), spec)
    enc = encode_rows(spec, vocab, cols)
    enc.pop("history", None)  # filled per batch
    enc.pop("id")  # row r's id input is r + OFFSET: added per batch, not held (80 MB at 10M users)
    return {k: torch.as_tensor(v) for k, v in enc.items()}


@dataclass
class Events:
    """All events as row arrays (n_events,), in the Dataset's order."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray
    request: np.ndarray  # request code, -1 when absent
    # label columns of objectives added to a trained cascade (csmf.objectives.define)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def positive(self, objective: str) -> np.ndarray:
        """Boolean mask of events that are positives of ``objective`` (csmf.objectives)."""
        labels = {c: getattr(self, c) for c in funnel.LABEL_COLUMNS} | self.extra
        o = funnel.get(objective)
        if o.column is not None and o.column not in labels:
            raise DataError(f"the events have no column {o.column!r} ({objective} positives)")
        return o.positive(labels, len(self.user))


class History:
    """Per-user time-sorted history items (item vocab indices) of the train split, CSR."""

    def __init__(self, ev: Events, rows: np.ndarray, n_users: int, max_len: int) -> None:
        rows = rows[np.lexsort((ev.ts[rows], ev.user[rows]))]
        self.max_len = max_len
        self.ts_values = np.unique(ev.ts)  # dense time ranks make one sortable int64 key
        self.items = ev.item[rows] + OFFSET  # (H,)
        self.key = self._key(ev.user[rows], ev.ts[rows])  # (H,) sorted
        self.ptr = np.zeros(n_users + 1, np.int64)
        np.cumsum(np.bincount(ev.user[rows], minlength=n_users), out=self.ptr[1:])

    def _key(self, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
        rank = np.searchsorted(self.ts_values, ts)
        return user * (len(self.ts_values) + 1) + rank

    def before(self, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """End positions for histories of events (user, ts): entries strictly earlier than ts."""
        return np.searchsorted(self.key, self._key(user, ts), side="left")

    def all_of(self, user: np.ndarray) -> np.ndarray:
        return self.ptr[user + 1]

    def gather(self, user: np.ndarray, end: np.ndarray, drop: np.ndarray | None = None) -> Tensor:
        """(B, L) most recent ``max_len`` history items before ``end``, right-aligned, 0 = PAD.

        ``drop`` (B,) item rows to blank out of each row's window (the example's own target when
        training sees the user's whole history).
        """
        if len(self.items) == 0:
            return torch.zeros((len(user), self.max_len), dtype=torch.int64)
        pos = end[:, None] + np.arange(-self.max_len, 0)[None, :]  # (B, L)
        valid = pos >= self.ptr[user][:, None]
        out = np.where(valid, self.items[np.clip(pos, 0, len(self.items) - 1)], 0)
        if drop is not None:
            out[out == (drop[:, None] + OFFSET)] = 0
        return torch.as_tensor(out, dtype=torch.int64)


class Candidates:
    """Per-request candidate items (shown but not exposed), CSR over request codes."""

    def __init__(self, request: np.ndarray, item: np.ndarray, n_requests: int) -> None:
        order = np.argsort(request, kind="stable")
        self.items = item[order]
        self.ptr = np.zeros(n_requests + 1, np.int64)
        np.cumsum(np.bincount(request, minlength=n_requests), out=self.ptr[1:])

    def sample(self, request: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """(B, k) item rows drawn with replacement from each request's candidates, -1 if none."""
        out = np.full((len(request), k), -1, np.int64)
        has = request >= 0
        start, stop = self.ptr[request[has]], self.ptr[request[has] + 1]
        count = stop - start
        draw = start[:, None] + (rng.random((len(start), k)) * count[:, None]).astype(np.int64)
        out[has] = np.where(
            count[:, None] > 0, self.items[np.minimum(draw, len(self.items) - 1)], -1
        )
        return out


class PageViews:
    """Per page view (request code), the items shown in it but not clicked, CSR; built from the
    train split's events only, so no validation or test event becomes a negative."""

    def __init__(self, ev: Events, rows: np.ndarray, n_requests: int) -> None:
        self.source = (
            rows  # the train rows it was built from (InMemoryEncoded rebuilds on a new split)
        )
        rows = rows[(ev.request[rows] >= 0) & ~ev.clicked[rows]]
        order = np.argsort(ev.request[rows], kind="stable")
        self.items = ev.item[rows][order]
        self.ptr = np.zeros(n_requests + 1, np.int64)
        np.cumsum(np.bincount(ev.request[rows], minlength=n_requests), out=self.ptr[1:])

    def sample(
        self, request: np.ndarray, pos: np.ndarray, k: int, rng: np.random.Generator
    ) -> np.ndarray:
        """(B, k) item rows: up to ``k`` distinct entries of each row's page view, drawn
        without replacement, never the row's positive item ``pos``; -1 pads rows with fewer."""
        out = np.full((len(request), k), -1, np.int64)
        has = request >= 0
        start = np.where(has, self.ptr[np.maximum(request, 0)], 0)
        count = np.where(has, self.ptr[np.maximum(request, 0) + 1] - start, 0)
        width = int(count.max(initial=0))  # the largest page view in the batch
        if width == 0:
            return out
        slot = np.arange(width)[None, :]  # (1, W)
        valid = slot < count[:, None]  # (B, W)
        items = np.where(
            valid, self.items[np.minimum(start[:, None] + slot, len(self.items) - 1)], -1
        )
        valid &= items != pos[:, None]  # the positive itself is never its own negative
        keys = np.where(valid, rng.random(valid.shape), 2.0)  # random order, invalid last
        pick = np.argsort(keys, axis=1, kind="stable")[:, :k]  # (B, min(k, W))
        chosen = np.take_along_axis(items, pick, 1)
        out[:, : pick.shape[1]] = np.where(np.take_along_axis(valid, pick, 1), chosen, -1)
        return out


@dataclass
class Encoded(ABC):
    """Everything training and evaluation need, as arrays/tensors: the protocol the cascade,
    the baselines and evaluation are written against. Two kinds: :class:`InMemoryEncoded`
    (:func:`encode_dataset`, every event held) and :class:`trainer.data.stream.StreamedEncoded`
    (out of core: ``events``/``split`` then hold only the validation sample)."""

    spec: FeatureSpec
    user_vocab: TowerVocab
    item_vocab: TowerVocab
    users: dict[str, Tensor]  # (n_users, ...)
    items: dict[str, Tensor]  # (n_items, ...)
    events: Events
    split: Split
    history: History | None
    candidates: Candidates | None
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def examples(
        self,
        objective: str,
        since: int | None = None,
        replay: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> Examples:
        """The train-split positives of ``objective`` (see :func:`stage_examples`)."""

    @abstractmethod
    def page_views(self) -> PageViews:
        """Shown-but-not-clicked items per page view of the train split (loss.page_negatives)."""

    @abstractmethod
    def split_sizes(self) -> tuple[int, int, int]:
        """(train, validation, test) events of the whole dataset."""

    @abstractmethod
    def train_times(self) -> np.ndarray | None:
        """Timestamps of the train split's events, or None when they are not held."""

    def to(self, device: torch.device) -> Self:
        """Move the user/item feature tensors to ``device`` once; batches are built there."""
        self.users = {k: v.to(device) for k, v in self.users.items()}
        self.items = {k: v.to(device) for k, v in self.items.items()}
        self.device = device
        return self

    @property
    def n_users(self) -> int:
        return self.user_vocab.ids.size

    @property
    def n_items(self) -> int:
        return self.item_vocab.ids.size

    def user_batch(
        self, user: np.ndarray, hist_end: np.ndarray | None = None, drop: np.ndarray | None = None
    ) -> dict[str, Tensor]:
        """Inputs of users ``user`` (B,); history up to ``hist_end`` (default: all train events),
        without the items ``drop`` (B,) if given."""
        idx = torch.as_tensor(user, device=self.device)
        batch = {"id": idx + OFFSET, **{k: v[idx] for k, v in self.users.items()}}
        if self.history is not None:
            end = self.history.all_of(user) if hist_end is None else hist_end
            batch["history"] = self.history.gather(user, end, drop).to(self.device)
        return batch

    def item_batch(self, item: np.ndarray | Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(item, device=self.device)
        return {"id": idx + OFFSET, **{k: v[idx] for k, v in self.items.items()}}


@dataclass
class InMemoryEncoded(Encoded):
    """A dataset with every event in memory (:func:`encode_dataset`)."""

    pages: PageViews | None = None  # built by page_views() on first use

    def examples(
        self,
        objective: str,
        since: int | None = None,
        replay: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> StageExamples:
        ev = self.events
        rows = self.split.train
        rows = rows[ev.positive(objective)[rows]]
        if since is not None:
            new = ev.ts[rows] > since
            old, rows = rows[~new], rows[new]
            k = min(len(old), round(replay * len(rows)))
            if k:
                rows = np.sort(np.concatenate([rows, rng.choice(old, k, replace=False)]))
        elif len(rows) == 0:
            raise DataError(f"no {objective} positives in the train split")
        user, item = ev.user[rows], ev.item[rows]
        hist_end = (
            self.history.before(user, ev.ts[rows])
            if self.history is not None
            else np.zeros_like(user)
        )
        counts = np.bincount(item, minlength=self.n_items).astype(np.float64)
        return StageExamples(
            user,
            item,
            hist_end,
            ev.request[rows],
            torch.as_tensor(counts / max(counts.sum(), 1.0), dtype=torch.float32),
        )

    def page_views(self) -> PageViews:
        """Built on first use and rebuilt when the split changes; a clear error when the data
        has no page views."""
        if not (self.events.request >= 0).any():
            raise DataError(
                "loss.page_negatives > 0 needs page views, but the events have no request_id "
                "(e.g. MovieLens-100K: one rating is not shown beside others); "
                "set loss.page_negatives = 0"
            )
        if self.pages is None or self.pages.source is not self.split.train:
            n_requests = int(self.events.request.max()) + 1
            self.pages = PageViews(self.events, self.split.train, n_requests)
        return self.pages

    def split_sizes(self) -> tuple[int, int, int]:
        return len(self.split.train), len(self.split.val), len(self.split.test)

    def train_times(self) -> np.ndarray:
        return self.events.ts[self.split.train]


def encode_dataset(
    ds: Dataset,
    spec: FeatureSpec,
    split: Split,
    vocabs: tuple[TowerVocab, TowerVocab] | None = None,
) -> InMemoryEncoded:
    """Encode users, items and events; ``vocabs`` (from a checkpoint) or fitted on the tables."""
    user_vocab, item_vocab = vocabs if vocabs is not None else fit_vocabs(ds, spec)
    users, items = ds.users, ds.items
    if vocabs is not None:  # a checkpoint's (or a warm start's grown) vocabularies
        users, _ = with_absent_rows(users, spec.user.id_column, user_vocab)
        items, _ = with_absent_rows(items, spec.item.id_column, item_vocab)
    ev = ds.events
    request = np.full(ev.num_rows, -1, np.int64)
    candidates = None
    if "request_id" in ev.column_names:
        req_ids = pc.unique(ev["request_id"].drop_null())
        codes = pc.index_in(ev["request_id"], value_set=req_ids)
        request = codes.to_numpy(zero_copy_only=False)
        request = np.where(np.isnan(request.astype(np.float64)), -1, request).astype(np.int64)
        if ds.candidates is not None and ds.candidates.num_rows:
            creq = pc.index_in(ds.candidates["request_id"], value_set=req_ids).to_numpy(
                zero_copy_only=False
            )
            candidates = Candidates(
                creq.astype(np.int64),
                rows_of(ds.candidates["item_id"], item_vocab, "candidate item"),
                len(req_ids),
            )
    events = Events(
        user=rows_of(ev["user_id"], user_vocab, "event user"),
        item=rows_of(ev["item_id"], item_vocab, "event item"),
        ts=ev["timestamp"].to_numpy().astype(np.int64),
        request=request,
        **{c: ev[c].to_numpy(zero_copy_only=False).astype(bool) for c in funnel.LABEL_COLUMNS},
        extra={
            o.column: ev[o.column].to_numpy(zero_copy_only=False).astype(bool)
            for o in funnel.defined()
            if o.column in ev.column_names
        },
    )
    history = None
    if spec.user.history is not None:
        rows = split.train
        rows = rows[events.positive(spec.user.history.source)[rows]]
        history = History(events, rows, user_vocab.ids.size, spec.user.history.max_len)
    return InMemoryEncoded(
        spec=spec,
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        users=encode_table(users, spec.user, user_vocab),
        items=encode_table(items, spec.item, item_vocab),
        events=events,
        split=split,
        history=history,
        candidates=candidates,
    )


class StepBatch(NamedTuple):
    """One step's examples: ``rows`` of ``part`` are this rank's; ``n_global`` is the global
    batch size (every rank's rows together)."""

    part: StageExamples
    rows: np.ndarray
    n_global: int


class Examples(Protocol):
    """A stage's training positives as the cascade sees them, in memory
    (:class:`StageExamples`) or streamed from Parquet (:class:`trainer.data.stream.StreamExamples`).

    Every draw from the shared ``rng`` happens when :meth:`batches` is *called*, not while its
    iterator runs, so the iterator can run ahead in a background thread
    (:mod:`trainer.prefetch`) without changing the random stream.
    """

    item_prob: Tensor

    def __len__(self) -> int: ...

    def steps(self, batch_size: int, world: int) -> int:
        """Steps per epoch at ``batch_size`` per rank (the same on every rank)."""
        ...

    def batches(
        self, rng: np.random.Generator, batch_size: int, rank: int, world: int
    ) -> Iterator[StepBatch]:
        """One epoch of this rank's batches."""
        ...

    def draw_subset(self, frac: float, rng: np.random.Generator) -> np.ndarray:
        """Accuracy recovery's rho subset as a token :meth:`take` accepts (resume stores it)."""
        ...

    def take(self, token: np.ndarray, frac: float) -> Examples:
        """The subset :meth:`draw_subset` drew (same item_prob)."""
        ...


@dataclass
class StageExamples:
    """Training positives of one stage (train split only), in memory, plus their sampling
    distribution. An :class:`Examples`."""

    user: np.ndarray  # (E,)
    item: np.ndarray  # (E,)
    hist_end: np.ndarray  # (E,) history end positions (strictly earlier events)
    request: np.ndarray  # (E,) request code or -1
    item_prob: Tensor  # (n_items,) frequency of each item among these positives

    def __len__(self) -> int:
        return len(self.user)

    def steps(self, batch_size: int, world: int) -> int:
        bs = batch_size * world
        return (len(self) + bs - 1) // bs

    def batches(
        self, rng: np.random.Generator, batch_size: int, rank: int, world: int
    ) -> Iterator[StepBatch]:
        """Slices of one permutation every rank draws alike; rank r takes every world-th row."""
        perm = rng.permutation(len(self))  # drawn now, not when iterated
        bs = batch_size * world

        def walk() -> Iterator[StepBatch]:
            for lo in range(0, len(perm), bs):
                chunk = perm[lo : lo + bs]
                yield StepBatch(self, chunk[rank::world], len(chunk))

        return walk()

    def draw_subset(self, frac: float, rng: np.random.Generator) -> np.ndarray:
        return np.sort(rng.choice(len(self), size=max(1, round(len(self) * frac)), replace=False))

    def take(self, token: np.ndarray, frac: float) -> StageExamples:
        return self.select(token)

    def select(self, idx: np.ndarray) -> StageExamples:
        return StageExamples(
            self.user[idx], self.item[idx], self.hist_end[idx], self.request[idx], self.item_prob
        )

    def subset(self, frac: float, rng: np.random.Generator) -> StageExamples:
        """A random fraction of the examples (accuracy recovery's rho); same item_prob."""
        return self.select(self.draw_subset(frac, rng))


def stage_examples(
    enc: Encoded,
    objective: str,
    since: int | None = None,
    replay: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Examples:
    """The train-split positives of ``objective``; with ``since`` only events after that time
    (a warm start's new events — an empty set is then allowed, the stage has nothing new) plus,
    with ``replay``, that many older positives per new one, drawn by ``rng`` (rehearsal: the
    fine-tune also sees the past it must not forget). In memory or streamed alike."""
    return enc.examples(objective, since, replay, rng)


def user_items(
    enc: Encoded, rows: np.ndarray, mask: np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """user row → unique item rows of the events ``rows`` (optionally filtered by ``mask``)."""
    if mask is not None:
        rows = rows[mask[rows]]
    pairs = np.unique(np.stack([enc.events.user[rows], enc.events.item[rows]], 1), axis=0)
    if len(pairs) == 0:
        return {}
    cut = np.flatnonzero(np.diff(pairs[:, 0])) + 1
    return {int(g[0, 0]): g[:, 1] for g in np.split(pairs, cut)}
