"""Encode → scale → search, with no FastAPI in sight (docs/design.md#the-request-path).

One forward pass of the numpy user tower gives ``e`` (D,); the query is ``c ⊙ e`` with
``c = slice_scale(weights)``, and one inner-product search over the unscaled item vectors returns
items ranked by ``sum_t k_t s_t``. The search goes through the bundle's ``VectorIndex``
(csmf.index: FAISS or Milvus); exclusions travel as a ``Where`` and are applied inside the search
(FAISS ID selectors, Milvus expressions: exact, an excluded item is never scored, nothing is
over-fetched and filtered). ``exclude_seen`` is the exception: it fetches ``k + |seen|`` — the
most results seen items can displace — and drops them, which returns exactly what a selector
would (tested), because a selector makes FAISS test every scanned vector against it (measured:
an IVF search with a 40-row selector cost about twice one without) while the extra results cost
little. Histories longer than ``SEEN_AFTER_SEARCH`` go into the selector instead.

Everything here reads immutable state prepared at load time; a reload builds a new Retriever and
the app swaps one reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic_core import to_json

from csmf.bundle import Bundle
from csmf.catalogue import Catalogue
from csmf.index import RowSet, Where
from csmf.index.filters import Filter, FilterError, filter_key, parse_filter
from csmf.user_encoder import CodedHistory
from csmf.weights import cumulative_slice_scores, parse_weights, slice_scale
from service.errors import FieldError
from service.feature_store import UserData
from service.item_json import ItemJson
from service.request_ids import item_fingerprints

SCALE_CACHE = 4096  # distinct weight vectors whose (D,) scale is kept
SEEN_AFTER_SEARCH = 1024  # longer histories are excluded inside the search (see above)
FILTER_CACHE = 32  # distinct filters whose allowed-row bitmap is kept (~1.1 MB each at 1M items)


@dataclass(slots=True)
class Hits:
    """One user's results: index rows, fused scores, per-objective scores (explain)."""

    rows: list[int]
    scores: list[float]
    per_objective: np.ndarray | None  # (k, T) s_t
    cold_start: bool
    warnings: list[str] | None = None  # e.g. inline history ids unknown to the bundle


def unknown_history_warning(unknown: Sequence[str], n: int) -> str:
    """The response warning for inline history ids that are not in the bundle's catalogue."""
    shown = ", ".join(repr(u) for u in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    if len(unknown) == n:
        return (
            f"history: none of its {n} item ids is in the served bundle ({shown}); it was ignored"
        )
    return f"history: {len(unknown)} of its {n} item ids are not in the served bundle ({shown})"


Lookup = Callable[[Any, str], UserData | None]
Observe = Callable[[str, float], None]


def _best(
    rows: np.ndarray, scores: np.ndarray, seen: np.ndarray | None, k: int
) -> tuple[list[int], list[float]]:
    """The first ``k`` valid rows of one search result (FAISS pads with -1) that are not in
    ``seen``, with their scores, as lists: plain Python on the ~k + |seen| candidates, which
    replaced a (fetch, |seen|) numpy mask and its four small array operations on the hot path.
    The scan stops at the k-th kept row: a batch's k=10 fetches k + the longest history (~60)."""
    r, s = rows.tolist(), scores.tolist()
    drop = set(seen.tolist()) if seen is not None else None
    if not drop and (not r or r[-1] >= 0):  # nothing to drop (-1 pads only the tail)
        return r[:k], s[:k]
    out_r: list[int] = []
    out_s: list[float] = []
    for x, y in zip(r, s, strict=True):
        if x < 0:  # padding: no valid row after it
            break
        if not drop or x not in drop:
            out_r.append(x)
            out_s.append(y)
            if len(out_r) == k:
                break
    return out_r, out_s


class Retriever:
    def __init__(
        self, bundle: Bundle, lookup: Lookup, observe: Observe = lambda stage, s: None
    ) -> None:
        self.bundle = bundle
        self.objectives = bundle.objectives
        self.slice_sizes = bundle.slice_sizes
        self.model_version = bundle.model_version
        self.encoder = bundle.encoder
        self.users = bundle.users
        self.n_items = len(bundle.index)
        self.item_ids = bundle.item_ids
        self.item_rows = bundle.item_rows  # built now, not on the first request that excludes
        self.item_fps = item_fingerprints(bundle.item_ids.tolist())  # (N,) for request ids
        self.item_json = ItemJson(bundle.item_ids.tolist(), bundle.item_meta)
        self.id_column = bundle.encoder.spec.id_column
        self.has_history = bundle.encoder.spec.history is not None
        self.cold_vector = bundle.encoder.cold_start().reshape(1, -1)  # (1, D)
        self.loaded_at = time.time()
        self._lookup = lookup
        self._observe = observe
        self._scales: dict[tuple[float, ...], np.ndarray] = {}
        self._explicit: dict[tuple, tuple[tuple[float, ...], np.ndarray]] = {}
        self._weights_json: dict[tuple[float, ...], bytes] = {}
        self.model_version_json = to_json(self.model_version)
        self._filters: dict[str, tuple[Filter, RowSet]] = {}
        # (scenario, version, updated_at) → (weights, scale), filled by the app state
        self.scenario_cache: dict[tuple, tuple[tuple[float, ...], np.ndarray]] = {}
        self.catalogue: Catalogue | None = None  # set by ServedBundle: the item log applied

    # -- item writes ------------------------------------------------------------------------------

    def on_items(self, rows: np.ndarray) -> None:
        """The catalogue wrote ``rows`` (csmf.catalogue calls this after growing the item table
        and before writing the index): serialise their JSON, fingerprint new ids, and drop the
        cached filter bitmaps (they cover the old table). Each swap is one reference or one list
        item: a request in flight sees the old value or the new one."""
        b = self.bundle
        ids = b.item_ids
        n = len(ids)
        fps = self.item_fps
        if n > len(fps):
            self.item_fps = np.concatenate([fps, item_fingerprints(ids[len(fps) :].tolist())])
        self.item_json.set_rows(rows.tolist(), ids, b.item_meta)
        self.item_ids = ids
        self.n_items = n
        self._filters = {}

    # -- weights ----------------------------------------------------------------------------------

    def weights(self, weights: Any) -> tuple[float, ...]:
        """Validated weight tuple in cascade order (raises WeightsError)."""
        return parse_weights(weights, self.objectives)

    def explicit(self, weights: Any) -> tuple[tuple[float, ...], np.ndarray]:
        """(validated weights, scale) of a request's explicit ``weights`` (a name → value dict or
        a list), cached by value: validation and scale are functions of the value."""
        try:
            key = tuple(weights.items()) if isinstance(weights, dict) else tuple(weights)
            hit = self._explicit.get(key)
        except TypeError:  # unhashable values: pydantic's or parse_weights' error follows
            key, hit = None, None
        if hit is None:
            w = self.weights(weights)
            hit = (w, self.scale(w))
            if key is not None:
                if len(self._explicit) >= SCALE_CACHE:
                    self._explicit.clear()
                self._explicit[key] = hit
        return hit

    def weights_json(self, weights: tuple[float, ...]) -> bytes:
        """``{"exposure": k_d, ...}`` of a response, serialised once per distinct weights."""
        j = self._weights_json.get(weights)
        if j is None:
            if len(self._weights_json) >= SCALE_CACHE:
                self._weights_json.clear()
            j = self._weights_json[weights] = to_json(
                dict(zip(self.objectives, weights, strict=True))
            )
        return j

    def scale(self, weights: tuple[float, ...]) -> np.ndarray:
        s = self._scales.get(weights)
        if s is None:
            if len(self._scales) >= SCALE_CACHE:
                self._scales.clear()
            s = self._scales[weights] = slice_scale(weights, self.slice_sizes).astype(np.float32)
        return s

    # -- users ------------------------------------------------------------------------------------

    def user(
        self, user_id: str | None, history: Sequence[str] | None
    ) -> tuple[dict, list[str], bool, list[str] | None]:
        """(raw features row, history used, cold_start, warnings). Inline history replaces the
        stored one. Inline ids the bundle does not know would encode as UNK without a word: they
        are reported, and a history of only unknown ids counts as no history (cold start unless
        the user is known)."""
        data = self._lookup(self.users, user_id) if user_id is not None else None
        if data is None:
            row: dict = {self.id_column: user_id} if user_id is not None else {}
            stored: list[str] = []
        else:
            row, stored = data
            if self.id_column not in row:
                row = {**row, self.id_column: user_id}
        hist = history if history is not None else stored
        warnings = None
        if history:
            known = self.item_rows
            unknown = [h for h in history if h not in known]
            if unknown:
                warnings = [unknown_history_warning(unknown, len(history))]
                if len(unknown) == len(history):
                    hist = []
        cold = data is None and (not hist or not self.has_history)
        return row, hist, cold, warnings

    def rows_of(self, ids: Sequence[str]) -> list[int]:
        if isinstance(ids, CodedHistory) and ids.resolved:  # a stored history: rows precomputed
            return ids.rows().tolist()
        get = self.item_rows.get
        return [r for r in map(get, ids) if r is not None]

    def seen_rows(self, hist: Sequence[str]) -> np.ndarray:
        """(S,) int64 index rows of a history's items that are in the index."""
        if isinstance(hist, CodedHistory) and hist.resolved:
            return hist.rows().astype(np.int64, copy=False)
        return np.asarray(self.rows_of(hist), dtype=np.int64)

    # -- filters ----------------------------------------------------------------------------------

    def compile_filter(self, obj: Any) -> tuple[Filter, RowSet]:
        """(AST, allowed rows) of a request's ``filter``, validated against the bundle's
        filterable columns (FieldError naming the bad part → 422); cached per distinct filter."""
        key = filter_key(obj)
        hit = self._filters.get(key)
        if hit is None:
            attrs = self.bundle.attributes
            try:
                f = parse_filter(obj, attrs.schema)
            except FilterError as exc:
                raise FieldError(exc.loc, exc.msg) from None
            mask = attrs.mask(f)
            dead = self.bundle.dead  # deleted rows: excluded here too, whatever the backend
            if dead is not None and dead.any():
                mask = mask & ~dead[: len(mask)]
            filters = self._filters
            if len(filters) >= FILTER_CACHE:
                filters.clear()
            hit = filters[key] = (f, RowSet(mask))
        return hit

    def _where(self, excluded: list[int], filter_: Any = None) -> Where | None:
        if filter_ is None:
            if not excluded:
                return None
            return Where(exclude=np.asarray(excluded, dtype=np.int64))
        f, allowed = self.compile_filter(filter_)
        ex = np.asarray(excluded, dtype=np.int64) if excluded else None
        return Where(filter=f, allowed=allowed, exclude=ex)

    # -- one user ---------------------------------------------------------------------------------

    def retrieve(
        self,
        user_id: str | None,
        history: Sequence[str] | None,
        scale: np.ndarray,
        k: int,
        exclude: Sequence[str] = (),
        exclude_seen: bool = False,
        explain: bool = False,
        filter_: Any = None,
    ) -> Hits:
        t0 = time.perf_counter()
        row, hist, cold, warnings = self.user(user_id, history)
        t1 = time.perf_counter()
        e = self.cold_vector if cold else self.encoder.encode([row], [hist])  # (1, D)
        t2 = time.perf_counter()
        excluded = self.rows_of(exclude) if exclude else []
        seen = self.seen_rows(hist) if exclude_seen and hist else None
        if seen is not None and len(seen) > SEEN_AFTER_SEARCH:
            excluded += seen.tolist()
            seen = None
        fetch = k if seen is None or len(seen) == 0 else min(k + len(seen), self.n_items)
        scores, rows = self.bundle.search(e * scale, fetch, self._where(excluded, filter_))
        t3 = time.perf_counter()
        obs = self._observe
        obs("features", t1 - t0)
        obs("encode", t2 - t1)
        obs("search", t3 - t2)
        r, s = _best(rows[0], scores[0], seen if fetch > k else None, k)
        per = self.explain(e[0], r) if explain else None
        return Hits(r, s, per, cold, warnings)

    def explain(self, e: np.ndarray, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """(k, T) per-objective scores s_t = sum over dims owned <= t of e_j v_j."""
        t0 = time.perf_counter()
        if len(rows) == 0:
            return np.zeros((0, len(self.objectives)), np.float32)
        v = self.bundle.item_vectors(np.asarray(rows, dtype=np.int64))  # (k, D)
        out = cumulative_slice_scores(e, v, self.slice_sizes)  # (k, T)
        self._observe("explain", time.perf_counter() - t0)
        return out

    # -- many users -------------------------------------------------------------------------------

    def retrieve_batch(
        self,
        users: Sequence[tuple[str | None, Sequence[str] | None]],
        scale: np.ndarray,
        k: int,
        exclude: Sequence[str] = (),
        exclude_seen: bool = False,
        explain: bool = False,
        filter_: Any = None,
    ) -> list[Hits]:
        t0 = time.perf_counter()
        resolved = [self.user(uid, hist) for uid, hist in users]
        t1 = time.perf_counter()
        n = len(resolved)
        e = np.empty((n, self.cold_vector.shape[1]), np.float32)  # (n, D)
        warm = [i for i, (_, _, cold, _) in enumerate(resolved) if not cold]
        e[:] = self.cold_vector
        if warm:
            e[warm] = self.encoder.encode(
                [resolved[i][0] for i in warm], [resolved[i][1] for i in warm]
            )
        t2 = time.perf_counter()
        seen: list[np.ndarray] = []
        extra = 0
        if exclude_seen:
            seen = [self.seen_rows(hist) for _, hist, _, _ in resolved]
            extra = max(map(len, seen), default=0)
        where = self._where(self.rows_of(exclude) if exclude else [], filter_)
        fetch = min(k + extra, self.n_items)
        scores, rows = self.bundle.search(e * scale, fetch, where)  # (n, fetch)
        t3 = time.perf_counter()
        self._observe("features", t1 - t0)
        self._observe("encode", t2 - t1)
        self._observe("search", t3 - t2)
        out = []
        for i in range(n):
            r, s = _best(rows[i], scores[i], seen[i] if seen else None, k)
            per = self.explain(e[i], r) if explain else None
            out.append(Hits(r, s, per, resolved[i][2], resolved[i][3]))
        return out

    # -- response items ---------------------------------------------------------------------------

    def items_json(self, hits: Hits) -> bytes:
        """The response's ``items`` array as JSON bytes (see service/item_json.py)."""
        return self.item_json.render(hits.rows, hits.scores, hits.per_objective, self.objectives)

    def info(self) -> dict:
        b = self.bundle
        return {
            "path": str(b.path),
            "model_version": b.model_version,
            "objectives": list(b.objectives),
            "slice_sizes": list(b.slice_sizes),
            "index_type": b.index_type,
            "search_params": b.index.search_params,
            "index": {**b.index.capabilities.as_dict(), **b.index.stats()},
            "items": b.index.stats().get("items", self.n_items),
            "item_log": None if self.catalogue is None else self.catalogue.info(),
            "users": len(b.users),
            "filterable": b.attributes.schema,
            "response_json_bytes": self.item_json.bytes,
            "manifest": b.manifest.summary(),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        }
