"""FAISS backend: Flat (exact), IVF, HNSW and IVF-PQ (optionally OPQ) inner-product indexes.

Flat is exact; IVF, HNSW and IVF-PQ are approximate and their search-time knobs (efSearch,
nprobe, re-rank depth) go into the manifest, so the service applies exactly what the builder's
recall check measured.

Why centre (``centered``): q·x = q·(x - c) + q·c, so for any query the ranking over x - c is the
ranking over x and the score is recovered by adding q·c. HNSW graphs built with inner product
collapse when items share a large common component (typical of ReLU towers): greedy search cannot
reach most items (measured: recall@50 0.59 raw vs 0.96 centred, ef=128, on a random tower).

Filters and exclusions are FAISS search-time ID selectors (a bitmap of allowed rows, a batch of
excluded ones): exact, nothing over-fetched. On the approximate types a very selective filter
starves the search — IVF scans nprobe lists that hold few allowed items, HNSW's graph walk
disconnects. Above ``exact_below`` (HNSW 10 %; IVF 5 % at 100k items, less at larger catalogues,
see ``auto_exact_below``) of the catalogue the ANN search widens nprobe / efSearch by 1/share;
below it the search is brute force over the allowed rows instead (exact, and cheap: 0.5 % of 1M
items is 5k dot products). Flat takes the same path (same result, less work than testing the
selector on every row).

Item writes (docs/design.md#item-writes): flat and IVF take them natively, by id — flat is
wrapped in an ``IndexIDMap2`` on the first write (``remove_ids`` / ``add_with_ids``), IVF switches
its direct map to a hash table and removes / adds row ids in its inverted lists (new vectors go to
their nearest trained centroid: no retraining). HNSW cannot remove a node: a write appends a new
node, deleted and replaced nodes become tombstones excluded by an ID selector over the graph's
node ids (``_label`` maps node → row), and ``csmf index compact`` rebuilds the graph once their
share passes the manifest's ``tombstone_limit``. IVF-PQ is read-only (its exact re-rank vectors
are a memory-mapped file). Searches and writes share a readers-writer lock.

IVF-PQ keeps ``m`` bytes per item (plus ids) in memory; the float32 vectors stay on disk in
``vectors.npy``, memory-mapped, for the exact re-rank of ``rerank × k`` candidates, explain and
the exact fallback — only the rows touched are paged in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from csmf.errors import BundleError, ConfigError, ItemWriteError
from csmf.index.base import (
    TOMBSTONE_LIMIT,
    Capabilities,
    RowSet,
    VectorIndex,
    Where,
    check_write,
)
from csmf.progress import progress_bar
from csmf.rwlock import RWLock

FAISS_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"  # IVF-PQ: exact float32 vectors, memory-mapped at serving
ADD_CHUNK = 65536  # vectors per add() call, so long builds show progress
KNOBS = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}
# Below this share of the catalogue a filtered search is exact over the allowed rows. Measured at
# 100k items (bench/results/index-backends.md): the exact search over 5 % of the rows costs what
# IVF with nprobe widened by 1/share costs (0.6 vs 0.7 ms), at 10 % half of widened HNSW (1.1 vs
# 2.3 ms, whose recall also sags: 0.96 → 0.74 at 0.5 %); flat takes the gather below 5 % too.
EXACT_BELOW = {"flat": 0.05, "ivf": 0.05, "ivfpq": 0.05, "hnsw": 0.10}
# IVF's crossover moves with the catalogue: the exact search costs ∝ share·N, the widened one
# ∝ (nprobe/share)·(N/nlist), so they meet near share ≈ c·sqrt(nprobe/nlist). Measured
# (bench/exact_below.py → bench/results/exact-below.md; medians, one thread): at 1M items (nlist
# 4000, nprobe 32) exact 3.7 vs widened 5.8 ms at 1.5 %, 8.1 vs 4.1 ms at 2 %, 18 vs 3.2 ms at
# 5 %; at 100k (nlist 1265, nprobe 32) both paths cost under 1 ms up to 7 %. c = 0.2 switches at
# 1.8 % (1M) and 3.2 % (100k): right at 1M, where a wrong side costs milliseconds, and up to
# 0.4 ms on the dear side at 100k for filters allowing 3–7 %; capped at the measured 5 %.
IVF_EXACT_C = 0.2
IVF_EXACT_MIN = 0.002


def auto_exact_below(kind: str, nprobe: int = 0, nlist: int = 0) -> float:
    """The default ``exact_below``: the measured share for flat and HNSW; for IVF types the
    crossover c·sqrt(nprobe/nlist) (see IVF_EXACT_C), within [IVF_EXACT_MIN, 5 %]."""
    if kind in ("ivf", "ivfpq") and nprobe > 0 and nlist > 0:
        share = IVF_EXACT_C * math.sqrt(nprobe / nlist)
        return min(EXACT_BELOW[kind], max(IVF_EXACT_MIN, share))
    return EXACT_BELOW[kind]


EF_CAP = 4096
WRITES = {"flat": "native", "ivf": "native", "hnsw": "tombstone", "ivfpq": "none"}


@dataclass(frozen=True)
class FaissSpec:
    """How to build a FAISS index (index_builder.config.BuildConfig makes one)."""

    kind: str = "ivf"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None  # None = ~4·sqrt(N), capped for small catalogues
    nprobe: int = 32
    train_per_list: int = 128
    pq_m: int | None = None  # IVF-PQ sub-quantizers (bytes per item at 8 bits); None = dim / 4
    pq_bits: int | None = None  # bits per sub-quantizer code; None = 8, fewer for tiny catalogues
    opq: bool = False  # learn a rotation before PQ (OPQ): better recall, slower build
    rerank: int = 0  # IVF-PQ: re-rank rerank·k PQ candidates with the exact vectors; 0 = off
    exact_below: float | None = None  # filters allowing less than this share search exactly;
    # None = EXACT_BELOW[kind], measured in bench/results/index-backends.md
    centered: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAISS_TYPES:
            raise ConfigError(f"index must be one of {FAISS_TYPES}, got {self.kind!r}")
        if self.rerank and self.kind != "ivfpq":
            raise ConfigError(f"rerank applies to index ivfpq only, got index {self.kind!r}")
        if self.opq and self.kind != "ivfpq":
            raise ConfigError(f"opq applies to index ivfpq only, got index {self.kind!r}")
        if self.exact_below is not None and not 0.0 <= self.exact_below <= 1.0:
            raise ConfigError(f"exact_below must be in [0, 1], got {self.exact_below}")
        if self.rerank < 0:
            raise ConfigError(f"rerank must be >= 0, got {self.rerank}")
        if self.pq_bits is not None and not 1 <= self.pq_bits <= 16:
            raise ConfigError(f"pq_bits must be in [1, 16], got {self.pq_bits}")


def default_nlist(n: int) -> int:
    """~4·sqrt(N) lists, capped so k-means has >= 39 points per centroid (faiss warns below)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39, 65536)))


def default_pq(d: int, n: int, m: int | None, bits: int | None) -> tuple[int, int]:
    """(m, bits): m = d/4 sub-quantizers (a divisor of d); 8 bits, fewer when the catalogue
    cannot train 2^bits centroids per sub-quantizer with >= 39 points each."""
    if m is None:
        m = max(1, d // 4)
        while d % m:
            m -= 1
    if d % m:
        raise ConfigError(f"pq_m must divide the dimension {d}, got {m}")
    if bits is None:
        bits = int(min(8, max(1, math.floor(math.log2(max(n, 2) / 39)))))
    if n < 2**bits:
        raise ConfigError(f"pq_bits {bits} needs >= {2**bits} items to train, got {n}")
    return m, bits


class FaissIndex(VectorIndex):
    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        search_params: dict[str, Any],
        *,
        build_params: dict[str, Any] | None = None,
        item_offset: np.ndarray | None = None,
        exact_vectors: np.ndarray | None = None,
        exact_below: float | None = None,
        bytes_: int | None = None,
    ) -> None:
        self.index = index
        self.kind = kind
        self.dim = int(index.d)
        self.n = int(index.ntotal)
        self.build_params = dict(build_params or {})
        offset = None if item_offset is None else np.asarray(item_offset, np.float32)
        self.offset = offset if offset is not None and np.any(offset) else None  # (D,) or None
        self.exact = exact_vectors  # (N, D) float32 memmap (IVF-PQ) or None
        # None = auto_exact_below for the current search parameters (recorded as null); the auto
        # value is set by set_search_params, below
        self._exact_below = None if exact_below is None else float(exact_below)
        self.widen_filtered = True  # see _faiss_params; off only to measure what it buys
        self._bytes = bytes_
        self.capabilities = Capabilities("faiss", kind, kind == "flat", True, True, WRITES[kind])
        self._rw = RWLock()  # searches read, item writes write
        self._dead: np.ndarray | None = None  # (N,) bool by row, once anything was deleted
        self._written = False
        # HNSW after a write: node → row (M,) and row → node (N,, -1 = deleted), alive nodes (M,)
        self._label: np.ndarray | None = None
        self._node: np.ndarray | None = None
        self._alive: np.ndarray | None = None
        self._alive_bits: np.ndarray | None = None
        self._params: dict[str, Any] = {}
        self.build_info: dict[str, Any] = {}
        self._nlist = 0
        if kind in ("ivf", "ivfpq"):
            ivf = faiss.extract_index_ivf(index)
            self._nlist = int(ivf.nlist)
            if kind == "ivf" and ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()  # reconstruct(row) for explain and the exact fallback
        self.set_search_params(search_params)

    def __len__(self) -> int:
        return self.n

    # -- build ------------------------------------------------------------------------------------

    @classmethod
    def build(cls, vectors: np.ndarray, spec: FaissSpec, progress: bool = True) -> FaissIndex:
        """Index (N, D) float32 vectors; row i gets id i. ``build_info`` holds the timings."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        offset = None
        if spec.centered:
            offset = x.mean(0, dtype=np.float64).astype(np.float32)  # (D,)
            x = x - offset
        t0 = time.perf_counter()
        train_s = 0.0
        build: dict[str, Any] = {}
        if spec.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif spec.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = spec.ef_construction
            build = {"m": spec.hnsw_m, "ef_construction": spec.ef_construction}
        else:
            nlist = spec.nlist or default_nlist(n)
            if nlist > n:
                raise ConfigError(f"nlist must be <= number of items ({n}), got {nlist}")
            build = {"nlist": nlist}
            points = nlist * spec.train_per_list
            if spec.kind == "ivf":
                index = faiss.IndexIVFFlat(
                    faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT
                )
            else:
                m, bits = default_pq(d, n, spec.pq_m, spec.pq_bits)
                pre = f"OPQ{m}," if spec.opq else ""  # "np": no polysemous training (unused, slow)
                index = faiss.index_factory(
                    d, f"{pre}IVF{nlist},PQ{m}x{bits}np", faiss.METRIC_INNER_PRODUCT
                )
                build.update({"pq_m": m, "pq_bits": bits, "opq": spec.opq})
                points = max(points, 64 * 2**bits)  # PQ k-means wants >= 39 points per code
                faiss.downcast_index(faiss.extract_index_ivf(index)).pq.cp.seed = spec.seed
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = spec.seed
            ivf.cp.max_points_per_centroid = max(spec.train_per_list, 1)
            sample = _train_sample(x, points, spec.seed)
            index.train(sample)
            train_s = time.perf_counter() - t0
            build["train_points"] = int(len(sample))
        with progress_bar(n, f"add to {spec.kind}", "item", progress) as bar:
            for start in range(0, n, ADD_CHUNK):
                index.add(x[start : start + ADD_CHUNK])
                bar.update(min(ADD_CHUNK, n - start))
        if spec.kind == "ivf":
            faiss.extract_index_ivf(index).make_direct_map()
        params: dict[str, Any] = {}
        if spec.kind == "hnsw":
            params = {"ef_search": spec.ef_search}
        elif spec.kind in ("ivf", "ivfpq"):
            params = {"nprobe": min(spec.nprobe, build["nlist"])}
        if spec.kind == "ivfpq":
            params["rerank"] = spec.rerank
        exact = np.ascontiguousarray(vectors, dtype=np.float32) if spec.kind == "ivfpq" else None
        out = cls(
            index,
            spec.kind,
            params,
            build_params=build,
            item_offset=offset,
            exact_vectors=exact,
            exact_below=spec.exact_below,
        )
        out.build_info = {
            "train_seconds": round(train_s, 3),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        return out

    # -- search -----------------------------------------------------------------------------------

    @property
    def search_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def exact_below(self) -> float:
        """Filters allowing at most this share of the items search exactly over the allowed
        rows: the configured value, or ``auto_exact_below`` for the current nprobe."""
        return self._auto_exact_below if self._exact_below is None else self._exact_below

    @exact_below.setter
    def exact_below(self, value: float | None) -> None:
        self._exact_below = None if value is None else float(value)

    def set_search_params(self, params: dict[str, Any]) -> None:
        p = dict(params)
        if self.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = int(p["ef_search"])
        elif self.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(self.index).nprobe = int(p["nprobe"])
        if self.kind == "ivfpq":
            p["rerank"] = int(p.get("rerank", 0))
            if p["rerank"] and self.exact is None:
                raise BundleError("IVF-PQ re-rank needs the exact vectors file, none is loaded")
        self._params = p
        self._rerank = p.get("rerank", 0)
        self._auto_exact_below = auto_exact_below(self.kind, int(p.get("nprobe", 0)), self._nlist)

    def knob(self) -> tuple[str, int] | None:
        name = KNOBS.get(self.kind)
        if name is None:
            return None
        cap = faiss.extract_index_ivf(self.index).nlist if name == "nprobe" else EF_CAP
        return name, int(cap)

    def _faiss_params(self, sel: faiss.IDSelector, share: float = 1.0) -> faiss.SearchParameters:
        """Per-call parameters with the selector. A SearchParameters object *replaces* the index's
        own efSearch/nprobe with its defaults (efSearch=16, nprobe=1), so each must carry them.
        HNSW keeps ``bounded_queue=True``: with False, faiss <= 1.15 ignores ``sel`` (#5504).

        A filter allowing ``share`` of the items leaves IVF's nprobe lists / HNSW's ef candidates
        with ``share`` as many allowed ones, so (``widen_filtered``) both are divided by ``share``:
        the search sees as many allowed candidates as an unfiltered one (capped at nlist / EF_CAP).
        """
        widen = 1.0 / share if self.widen_filtered and share < 1.0 else 1.0
        if self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            ef = int(self._params["ef_search"])
            p.efSearch = min(max(ef, math.ceil(ef * widen)), max(ef, EF_CAP))
            p.bounded_queue = True
        elif self.kind in ("ivf", "ivfpq"):
            p = faiss.SearchParametersIVF()
            nprobe = int(self._params["nprobe"])
            p.nprobe = min(math.ceil(nprobe * widen), max(nprobe, self._nlist))
        else:
            p = faiss.SearchParameters()
        p.sel = sel
        p._sel_ref = sel  # the C++ object holds a raw pointer; keep the Python owner alive
        return p

    def search(
        self, queries: np.ndarray, k: int, where: Where | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # (b, D)
        allowed = exclude = None
        if where is not None:
            allowed, exclude = where.allowed, where.exclude
            if exclude is not None and len(exclude) == 0:
                exclude = None
        rw = self._rw
        rw.acquire_read()
        try:
            if allowed is not None and allowed.count <= self.exact_below * self.n:
                return self._exact_search(q, k, allowed.rows, exclude)
            if self._label is not None:  # HNSW after writes: a selector over graph nodes
                return self._search_nodes(q, k, allowed, exclude)
            return self._search(q, k, allowed, exclude)
        finally:
            rw.release_read()

    def _search(
        self, q: np.ndarray, k: int, allowed: RowSet | None, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = _selector(allowed, exclude)
        fetch = k * self._rerank if self._rerank else k
        share = 1.0 if allowed is None else allowed.count / max(self.n, 1)
        params = None if sel is None else self._faiss_params(sel, share)
        scores, rows = self.index.search(q, fetch, params=params)
        if self._rerank:
            return self._rerank_rows(q, rows, k)
        if self.offset is not None:
            scores += (q @ self.offset)[:, None]
        return scores, rows

    def _search_nodes(
        self, q: np.ndarray, k: int, allowed: RowSet | None, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """HNSW with tombstones: search the graph with a bitmap of the nodes that are alive,
        allowed and not excluded, then map nodes back to rows."""
        label = self._label
        if allowed is None and exclude is None:
            bits = self._alive_bits
            share = 1.0
        else:
            ok = self._alive.copy()
            if allowed is not None:
                mask = allowed.mask
                if len(mask) < self.n:
                    mask = np.concatenate([mask, np.zeros(self.n - len(mask), bool)])
                ok &= mask[label]
            if exclude is not None:
                nodes = self._node[exclude[(exclude >= 0) & (exclude < self.n)]]
                ok[nodes[nodes >= 0]] = False
            bits = np.packbits(ok, bitorder="little")
            share = 1.0 if allowed is None else allowed.count / max(self.n, 1)
        share *= self._live() / max(len(label), 1)  # tombstones thin the graph's candidates
        sel = faiss.IDSelectorBitmap(bits)
        params = self._faiss_params(sel, share)
        scores, nodes = self.index.search(q, k, params=params)
        rows = np.where(nodes >= 0, label[np.maximum(nodes, 0)], -1)
        if self.offset is not None:
            scores += (q @ self.offset)[:, None]
        return scores, rows

    def _exact_search(
        self, q: np.ndarray, k: int, rows: np.ndarray, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over ``rows`` (the allowed set): exact whatever the index type."""
        rows = rows[rows < self.n]  # the caller's item table may be ahead of the index
        if self._dead is not None:
            rows = rows[~self._dead[rows]]
        if exclude is not None:
            rows = rows[~np.isin(rows, exclude)]
        if len(rows) == 0:
            return _pad(np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), k)
        scores = q @ self._vectors(rows).T  # (b, |rows|)
        return _top_k(scores, rows, k)

    def _rerank_rows(
        self, q: np.ndarray, cand: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the (b, k') PQ candidates from the memory-mapped vectors → top k."""
        valid = cand >= 0
        v = self.exact[np.where(valid, cand, 0)]  # (b, k', D): only these pages are read
        scores = np.einsum("bd,bkd->bk", q, v)
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        s = np.take_along_axis(scores, order, 1)
        r = np.take_along_axis(cand, order, 1)
        if s.shape[1] < k:  # fewer candidates than k (tiny catalogue)
            s, r = _pad(s, r, k)
        return s.astype(np.float32), r

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows``; a deleted row (e.g. deleted between a search and its
        explain) reads as zeros."""
        rows = np.asarray(rows, dtype=np.int64)
        with self._rw.read():
            if self._dead is None or not self._dead[rows].any():
                return self._vectors(rows)
            out = np.zeros((len(rows), self.dim), np.float32)
            live = ~self._dead[rows]
            if live.any():
                out[live] = self._vectors(rows[live])
            return out

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) vectors of live rows (the caller holds the lock)."""
        if self.exact is not None:
            return np.asarray(self.exact[rows], dtype=np.float32)
        keys = rows if self._node is None else self._node[rows]
        v = self.index.reconstruct_batch(keys)
        return v + self.offset if self.offset is not None else v

    # -- item writes ------------------------------------------------------------------------------

    def upsert(
        self,
        rows: np.ndarray,
        vectors: np.ndarray,
        attributes: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if self.capabilities.writes == "none":
            super().upsert(rows, vectors, attributes)
        with self._rw.write():
            r, v = check_write(self.n, self.dim, rows, vectors)
            if r.size == 0:
                return
            if self.offset is not None:
                v = v - self.offset
            self._prepare_writes()
            old = r[r < self.n]
            live_old = old if self._dead is None else old[~self._dead[old]]
            new_n = max(self.n, int(r.max()) + 1)
            if self.kind == "hnsw":
                self._hnsw_upsert(r, v, new_n)
            else:
                if len(live_old):
                    self._remove(live_old)
                self.index.add_with_ids(v, r)
            if self._dead is not None:
                if new_n > len(self._dead):
                    self._dead = np.concatenate([self._dead, np.zeros(new_n - self.n, bool)])
                self._dead[r] = False
            self.n = new_n

    def delete(self, rows: np.ndarray) -> None:
        if self.capabilities.writes == "none":
            super().delete(rows)
        with self._rw.write():
            r, _ = check_write(self.n, self.dim, rows)
            if self._dead is None:
                self._dead = np.zeros(self.n, bool)
            r = r[~self._dead[r]]  # idempotent: deleted rows stay deleted
            if r.size == 0:
                return
            self._prepare_writes()
            if self.kind == "hnsw":
                nodes = self._node[r]
                self._alive[nodes] = False
                self._node[r] = -1
                self._alive_bits = np.packbits(self._alive, bitorder="little")
            else:
                self._remove(r)
            self._dead[r] = True

    def deleted_rows(self) -> np.ndarray:
        return np.zeros(0, np.int64) if self._dead is None else np.flatnonzero(self._dead)

    def tombstone_share(self) -> float:
        """HNSW: dead nodes / all nodes (0 for the types that remove natively)."""
        if self._alive is None:
            return 0.0
        return 1.0 - float(np.count_nonzero(self._alive)) / max(len(self._alive), 1)

    def _live(self) -> int:
        return self.n - (0 if self._dead is None else int(np.count_nonzero(self._dead)))

    def _prepare_writes(self) -> None:
        """On the first write: give the index what removal / re-adding by id needs."""
        if self._written:
            return
        if self.kind == "flat":
            flat = faiss.downcast_index(self.index)
            x = flat.reconstruct_n(0, flat.ntotal) if flat.ntotal else np.zeros((0, self.dim))
            inner = faiss.IndexFlatIP(self.dim)
            idmap = faiss.IndexIDMap2(inner)
            idmap.add_with_ids(np.ascontiguousarray(x, np.float32), np.arange(len(x)))
            self._keep = inner  # the wrapper holds a raw pointer to it
            self.index = idmap
        elif self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # Array cannot remove or add by id
        elif self.kind == "hnsw":
            m = int(self.index.ntotal)
            self._label = np.arange(m, dtype=np.int64)
            self._node = np.arange(m, dtype=np.int64)
            self._alive = np.ones(m, bool)
            self._alive_bits = np.packbits(self._alive, bitorder="little")
        self._written = True

    def _remove(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.int64)
        sel = faiss.IDSelectorArray(len(rows), faiss.swig_ptr(rows))  # hash-table direct map
        removed = self.index.remove_ids(sel)
        if removed != len(rows):
            raise ItemWriteError(f"FAISS removed {removed} of {len(rows)} rows {rows[:5]}...")

    def _hnsw_upsert(self, r: np.ndarray, v: np.ndarray, new_n: int) -> None:
        m = int(self.index.ntotal)
        nodes = np.arange(m, m + len(r), dtype=np.int64)
        if new_n > len(self._node):
            self._node = np.concatenate([self._node, np.full(new_n - len(self._node), -1)])
        old = self._node[r]
        self._alive[old[old >= 0]] = False
        self.index.add(v)
        self._label = np.concatenate([self._label, r])
        self._alive = np.concatenate([self._alive, np.ones(len(r), bool)])
        self._node[r] = nodes
        self._alive_bits = np.packbits(self._alive, bitorder="little")

    # -- persistence ------------------------------------------------------------------------------

    def save(self, folder: Path) -> dict[str, Any]:
        if self._written:
            raise BundleError(
                "this index took item writes: save its compacted() copy (csmf index compact)"
            )
        folder = Path(folder)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        files = [INDEX_FILE]
        self._bytes = (folder / INDEX_FILE).stat().st_size
        if self.exact is not None:
            np.save(folder / VECTORS_FILE, np.ascontiguousarray(self.exact, np.float32))
            files.append(VECTORS_FILE)
        return {
            "backend": "faiss",
            "type": self.kind,
            "build_params": self.build_params,
            "search_params": self.search_params,
            "item_offset": None if self.offset is None else self.offset.tolist(),
            "exact_below": self._exact_below,  # null: auto_exact_below, recomputed on load
            # HNSW takes deletes as tombstones: the share at which compaction is due
            "tombstone_limit": TOMBSTONE_LIMIT if WRITES[self.kind] == "tombstone" else None,
            "files": files,
            **self.build_info,
            **self.stats(),
        }

    @classmethod
    def load(
        cls,
        folder: Path,
        kind: str,
        search_params: dict[str, Any],
        *,
        build_params: dict[str, Any] | None = None,
        item_offset: Sequence[float] | None = None,
        exact_below: float | None = None,
    ) -> FaissIndex:
        path = Path(folder) / INDEX_FILE
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:  # faiss raises RuntimeError with the C++ message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"cannot read FAISS index {path}: {first}") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise BundleError(f"index metric is {index.metric_type}, expected inner product (0)")
        expected = {
            "flat": faiss.IndexFlat,
            "hnsw": faiss.IndexHNSW,
            "ivf": faiss.IndexIVFFlat,
            "ivfpq": (faiss.IndexIVFPQ, faiss.IndexPreTransform),
        }[kind]
        if not isinstance(faiss.downcast_index(index), expected):
            got = type(faiss.downcast_index(index)).__name__
            raise BundleError(f"manifest says index type {kind!r}, the file holds a {got}")
        exact = None
        if kind == "ivfpq":
            exact = _open_vectors(Path(folder) / VECTORS_FILE, int(index.ntotal), int(index.d))
        return cls(
            index,
            kind,
            search_params,
            build_params=build_params,
            item_offset=None if item_offset is None else np.asarray(item_offset, np.float32),
            exact_vectors=exact,
            exact_below=exact_below,
            bytes_=path.stat().st_size,
        )

    def compacted(self, rows: np.ndarray, progress: bool = False) -> FaissIndex:
        """A new index over the live ``rows`` (in that order: new row i = old row rows[i]) with
        this one's build and search parameters: flat and IVF re-add the vectors (IVF keeps its
        trained centroids), HNSW builds a fresh graph."""
        rows = np.asarray(rows, np.int64)
        with self._rw.read():
            if self._dead is not None and self._dead[rows].any():
                raise ItemWriteError("compaction was given deleted rows")
            x = self._vectors(rows) if len(rows) else np.zeros((0, self.dim), np.float32)
        stored = x - self.offset if self.offset is not None else x
        stored = np.ascontiguousarray(stored, np.float32)
        if self.kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            m = int(self.build_params.get("m", 32))
            index = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(self.build_params.get("ef_construction", 200))
        elif self.kind == "ivf":
            index = faiss.clone_index(self.index)
            ivf = faiss.extract_index_ivf(index)
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
            index.reset()
        else:
            raise ItemWriteError("IVF-PQ bundles take no item writes; rebuild them instead")
        with progress_bar(len(rows), f"compact {self.kind}", "item", progress) as bar:
            for start in range(0, len(rows), ADD_CHUNK):
                index.add(stored[start : start + ADD_CHUNK])
                bar.update(min(ADD_CHUNK, len(rows) - start))
        if self.kind == "ivf":
            faiss.extract_index_ivf(index).make_direct_map()
        return FaissIndex(
            index,
            self.kind,
            self.search_params,
            build_params=self.build_params,
            item_offset=self.offset,
            exact_below=self._exact_below,
        )

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"items": self._live()}
        if self._written:
            out["row_slots"] = self.n
            out["deleted"] = self.n - self._live()
        if self._alive is not None:
            out["tombstone_share"] = round(self.tombstone_share(), 4)
        if self._bytes is not None:
            out["bytes"] = int(self._bytes)
            out["bytes_per_item"] = round(self._bytes / max(self.n, 1), 1)
        if self.exact is not None:
            out["exact_vectors_bytes"] = int(self.exact.nbytes)  # on disk, memory-mapped
        return out


# -- helpers --------------------------------------------------------------------------------------


def _selector(allowed: RowSet | None, exclude: np.ndarray | None) -> faiss.IDSelector | None:
    """IDSelector for "allowed and not excluded" (the wrapper keeps sub-selectors referenced)."""
    sel = None
    if allowed is not None:
        sel = faiss.IDSelectorBitmap(allowed.bits)
    if exclude is not None:
        not_ex = faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude))
        sel = not_ex if sel is None else faiss.IDSelectorAnd(sel, not_ex)
    return sel


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, M) scores over candidate ``rows`` (M,) → best k per query, padded with -1/-inf."""
    m = scores.shape[1]
    if m > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        sub = np.take_along_axis(scores, part, 1)
        order = np.take_along_axis(part, np.argsort(-sub, axis=1, kind="stable"), 1)
    else:
        order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, 1).astype(np.float32)
    r = rows[order].astype(np.int64)
    return _pad(s, r, k) if s.shape[1] < k else (s, r)


def _pad(s: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    b, m = s.shape
    ps = np.full((b, k), -np.inf, np.float32)
    pr = np.full((b, k), -1, np.int64)
    ps[:, :m], pr[:, :m] = s, r
    return ps, pr


def _open_vectors(path: Path, n: int, d: int) -> np.ndarray:
    try:
        v = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read exact vectors {path}: {exc}") from None
    if v.shape != (n, d) or v.dtype != np.float32:
        raise BundleError(
            f"exact vectors {path} are {v.dtype}{v.shape}, expected float32({n}, {d})"
        )
    return v


def _train_sample(x: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    if len(x) <= max_points:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
    return x[rows]
