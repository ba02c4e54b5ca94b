"""The one seam between CSMF and a vector engine (docs/design.md#the-index-seam).

CSMF's objective weighting is a scale of the *query* (``q = c ⊙ e``), so any inner-product engine
serves every weighting exactly with one search over the unscaled item vectors. A backend therefore
needs only: build from (rows, vectors, attributes), search (b, D) queries for the top-k inner
products among allowed rows, read stored vectors back (explain), report its size, and describe
what it can do. Rows are the item's position in the bundle's item table (0..N-1); external ids
stay in the bundle.

Item writes (docs/design.md#item-writes): ``upsert`` replaces the vector of existing rows and
appends new rows at the end (rows are dense and never reused: the caller's item table assigns
the next free row); ``delete`` removes rows from search results. ``Capabilities.writes`` says how
a backend takes them: ``"native"`` (the engine removes and re-adds by id: FAISS flat / IVF /
IVF-PQ, Milvus), ``"tombstone"`` (FAISS HNSW: deleted rows stay in the graph and are filtered at
search time until a rebuild), ``"none"`` (read-only).

Which rows a search may return is a :class:`Where`: an attribute filter (typed, see
``csmf.index.filters``; engines that evaluate expressions translate it, the others read its
bitmap over the item table) and a set of excluded rows. The bitmap and the row list are
computed once per request by the caller, never by the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from csmf.errors import ItemWriteError

if TYPE_CHECKING:
    from csmf.index.filters import Filter


TOMBSTONE_LIMIT = 0.2  # tombstone backends: default share of dead entries that makes compaction due


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend is and can do, for the builder, the service and ``GET /admin/bundle``."""

    backend: str  # "faiss" | "milvus"
    kind: str  # the index type: flat, ivf, hnsw, ivfpq (FAISS); FLAT, IVF_FLAT, HNSW (Milvus)
    exact: bool  # search returns the exact top-k inner products (no recall check needed)
    filters: bool  # attribute filters and exclusions are applied inside the search
    in_bundle: bool  # the index lives in the bundle folder (else it is reached by a URI)
    writes: str = "none"  # item writes: "native" | "tombstone" | "none" (see the module doc)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "kind": self.kind,
            "exact": self.exact,
            "filters": self.filters,
            "in_bundle": self.in_bundle,
            "writes": self.writes,
        }


class RowSet:
    """An allowed subset of the N rows: a (N,) bool mask, its popcount, and — computed once, on
    first use — the packed little-endian bitmap (FAISS IDSelectorBitmap) and the row list."""

    __slots__ = ("mask", "count", "_bits", "_rows")

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.count = int(np.count_nonzero(mask))
        self._bits: np.ndarray | None = None
        self._rows: np.ndarray | None = None

    @property
    def bits(self) -> np.ndarray:
        if self._bits is None:
            self._bits = np.packbits(self.mask, bitorder="little")
        return self._bits

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.flatnonzero(self.mask).astype(np.int64)
        return self._rows


@dataclass(slots=True)
class Where:
    """The rows one search may return: allowed by ``filter`` and not in ``exclude``.

    ``allowed`` is ``filter`` evaluated over the item table, computed (and cached) by whoever
    compiled the filter, so a backend chooses between the bitmap and the expression without
    recomputing either.
    """

    filter: Filter | None = None
    allowed: RowSet | None = None
    exclude: np.ndarray | None = None  # (E,) int64 rows never returned


class VectorIndex(ABC):
    """Top-k inner-product search over N item vectors of dimension ``dim``; row ids 0..N-1."""

    capabilities: Capabilities
    dim: int

    @abstractmethod
    def __len__(self) -> int:
        """The number of row slots N: the largest row ever written + 1. Deleted rows keep their
        slot (rows are never reused or renumbered until a compaction builds a new bundle), so
        N is also the next free row and the length of the caller's item table."""

    # -- item writes ------------------------------------------------------------------------------

    def upsert(
        self,
        rows: np.ndarray,
        vectors: np.ndarray,
        attributes: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write item vectors. ``rows`` (n,) int64, distinct: a row < len(self) replaces that
        row's vector (and undeletes it if it was deleted); rows >= len(self) must be exactly
        len(self) .. len(self)+m-1 (in any order: new rows are dense) and append. ``vectors``
        (n, D) float32, finite, unscaled and permuted like the built ones. ``attributes``: the
        item-table columns of those rows, each (n,), for engines that filter by expression
        (Milvus stores them); engines that read the caller's bitmap (FAISS) ignore them.
        All-or-nothing: a batch that fails validation changes nothing (ItemWriteError).
        Not thread-safe against concurrent searches unless the backend says so: the service
        applies writes under its own lock."""
        raise ItemWriteError(
            f"the {self.capabilities.backend} {self.capabilities.kind} index does not take "
            "item writes; rebuild the bundle instead"
        )

    def delete(self, rows: np.ndarray) -> None:
        """Remove ``rows`` (n,) int64 from search results: a deleted row is never returned by
        ``search`` (whatever the filter / exclusion) until an upsert writes it again.
        Idempotent: deleting a deleted row is a no-op; a row >= len(self) is an ItemWriteError."""
        raise ItemWriteError(
            f"the {self.capabilities.backend} {self.capabilities.kind} index does not take "
            "item writes; rebuild the bundle instead"
        )

    def deleted_rows(self) -> np.ndarray:
        """(X,) int64 rows deleted since the bundle was built (sorted); empty by default."""
        return np.zeros(0, np.int64)

    @abstractmethod
    def search(
        self, queries: np.ndarray, k: int, where: Where | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(b, D) float32 queries → (scores, rows), each (b, k): exact inner products with the
        stored item vectors, best first; row -1 (score -inf) where fewer than k rows qualify."""

    @abstractmethod
    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 item vectors (as indexed; approximate for compressed types)."""

    # -- search-time parameters (efSearch, nprobe, ...) -------------------------------------------

    @property
    @abstractmethod
    def search_params(self) -> dict[str, Any]:
        """The search-time parameters in effect (recorded in the manifest)."""

    @abstractmethod
    def set_search_params(self, params: dict[str, Any]) -> None:
        """Apply search-time parameters (validated); used by the recall tuner and at load."""

    def knob(self) -> tuple[str, int] | None:
        """(name, largest useful value) of the one recall/speed knob, or None (exact types)."""
        return None

    # -- persistence and stats --------------------------------------------------------------------

    @abstractmethod
    def save(self, folder: Path) -> dict[str, Any]:
        """Persist into the bundle staging ``folder`` (or the engine); returns the manifest's
        index section: type, parameters, and where to find it."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """items, bytes (the index's own size) and bytes_per_item, plus backend details."""

    def health(self) -> str | None:
        """None while the index can answer searches, else what is wrong (an engine reached over
        the network may be away: /readyz reports it). In-process indexes are always healthy."""
        return None

    def close(self) -> None:
        """Release connections (no-op for in-process indexes)."""
        return None

    def discard(self) -> None:
        """Undo a build that will not be published: remove what it created outside the bundle
        folder (an engine collection), then close."""
        self.close()


class IndexSpec(BaseModel):
    """The manifest's ``index`` section: which backend, which index, how it was built and is
    searched, and where it lives (files in the bundle, or a URI + collection alias)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["faiss", "milvus"] = "faiss"
    type: str = Field(description="flat, hnsw, ivf, ivfpq (FAISS); FLAT, IVF_FLAT, HNSW (Milvus)")
    metric: Literal["inner_product"] = "inner_product"
    build_params: dict[str, Any] = Field(default_factory=dict)
    search_params: dict[str, Any] = Field(default_factory=dict)
    item_offset: list[float] | None = Field(
        None, description="mean subtracted from stored vectors (scores add q·offset back)"
    )
    exact_below: float | None = Field(
        None, ge=0, le=1, description="filters allowing a smaller share of items search exactly "
        "over the allowed rows; None = the backend's measured default"
    )  # fmt: skip
    tombstone_limit: float | None = Field(
        None, ge=0, le=1, description="tombstone backends (FAISS HNSW): share of deleted rows "
        "above which compaction is due (`csmf index compact --if-due`); None = TOMBSTONE_LIMIT"
    )  # fmt: skip
    files: list[str] = Field(default_factory=list, description="the index's files in the bundle")
    uri: str | None = Field(None, description="engine URI (Milvus: file or http://host:port)")
    collection: str | None = Field(None, description="Milvus alias the service searches")
    collection_version: str | None = Field(None, description="collection the alias pointed to")
    items: int | None = None
    bytes: int | None = None
    bytes_per_item: float | None = None
    exact_vectors_bytes: int | None = None
    train_seconds: float | None = None
    build_seconds: float | None = None
    tuning: dict[str, Any] | None = None


def check_write(
    n: int, dim: int, rows: Any, vectors: Any | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate an item write against an index of ``n`` row slots and dimension ``dim`` (the
    contract of :meth:`VectorIndex.upsert` / ``delete``); returns (rows int64, vectors float32
    C-contiguous or None). Raises ItemWriteError naming the first bad row."""
    r = np.asarray(rows)
    if r.ndim != 1 or not (r.dtype.kind in "iu" or r.size == 0):
        raise ItemWriteError(f"rows must be a 1-d integer array, got {r.dtype}{r.shape}")
    r = r.astype(np.int64, copy=False)
    if r.size and r.min() < 0:
        raise ItemWriteError(f"row {int(r.min())} is negative")
    uniq, counts = np.unique(r, return_counts=True)
    if np.any(counts > 1):
        raise ItemWriteError(f"row {int(uniq[counts > 1][0])} appears twice in one write")
    if vectors is None:
        if r.size and r.max() >= n:
            raise ItemWriteError(f"row {int(r.max())} does not exist (the index has {n} rows)")
        return r, None
    new = uniq[uniq >= n]
    if new.size and not np.array_equal(new, np.arange(n, n + new.size)):
        gap = int(np.setdiff1d(np.arange(n, n + new.size), new)[0])
        raise ItemWriteError(
            f"new rows must be dense from {n}: row {gap} is missing before row {int(new.max())}"
        )
    v = np.asarray(vectors)
    if v.ndim != 2 or v.shape[0] != r.size or v.shape[1] != dim:
        raise ItemWriteError(
            f"vectors must be ({r.size}, {dim}) for {r.size} rows of dimension {dim}, got {v.shape}"
        )
    if v.dtype.kind not in "fiu":
        raise ItemWriteError(f"vectors must be numbers, got {v.dtype}")
    v = np.ascontiguousarray(v, dtype=np.float32)
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise ItemWriteError(f"row {int(r[np.argmax(bad)])} has a NaN or infinite vector value")
    return r, v
