"""The retrieval contract every VectorIndex backend keeps, run against each FAISS index type,
Milvus Lite and a real Milvus 2.3 server (real engines, no mocks): weighted search exact on the exact types and within the
recall floor on the others, filters and exclusions equal to brute force over the allowed rows,
the selective-filter fallback, stored vectors read back."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from csmf.errors import ItemWriteError
from csmf.index import IndexSpec, RowSet, VectorIndex, Where, open_index
from csmf.index.faiss import FaissIndex, FaissSpec
from csmf.index.filters import ItemAttributes, parse_filter
from csmf.weights import slice_scale
from index_builder.recall import exact_topk, recall_with_ties, weight_grid

N, D, SIZES, K = 3000, 16, (6, 5, 5), 20
SCHEMA = {"genre": "string", "price": "number", "in_stock": "bool"}
FAISS_KINDS = {
    "flat": FaissSpec("flat"),
    "ivf": FaissSpec("ivf", nlist=32, nprobe=16),
    "hnsw": FaissSpec("hnsw", hnsw_m=16, ef_search=128, centered=True),
    "ivfpq": FaissSpec("ivfpq", nlist=32, nprobe=16, pq_m=4, pq_bits=6, rerank=8),
}
MILVUS_KINDS = {
    "milvus-flat": {"kind": "flat"},
    "milvus-ivf": {"kind": "ivf", "build_params": {"nlist": 32}, "search_params": {"nprobe": 16}},
}
# the same on a real Milvus 2.3 server (tests/fixtures/milvus.py), besides Milvus Lite
MILVUS_KINDS |= {f"milvus-server-{k.split('-')[1]}": v for k, v in MILVUS_KINDS.items()}
BACKENDS = [*FAISS_KINDS, *MILVUS_KINDS]
EXACT = {"flat", "milvus-flat", "milvus-server-flat"}
FILTERS = [
    {"field": "genre", "eq": "drama"},
    {"field": "genre", "in": ["comedy", "horror", "nope"]},
    {"field": "price", "gte": 10.0, "lt": 40},
    {"and": [{"field": "in_stock", "eq": True}, {"not": {"field": "genre", "eq": "drama"}}]},
    {"or": [{"field": "price", "gt": 60}, {"field": "genre", "eq": "docu"}]},
]


def _data():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, D)) * 2
    x = centres[rng.integers(0, 40, N)] + rng.standard_normal((N, D)) * 0.7 + 0.5
    users = rng.standard_normal((40, D)).astype(np.float32)
    genres = np.array(["action", "drama", "comedy", "horror", "docu"])[rng.integers(0, 5, N)]
    genre = [None if i % 17 == 0 else str(g) for i, g in enumerate(genres)]  # some nulls
    price = [None if i % 13 == 0 else float(p) for i, p in enumerate(rng.gamma(2.0, 15.0, N))]
    stock = [None if i % 29 == 0 else bool(b) for i, b in enumerate(rng.random(N) < 0.6)]
    table = pa.table(
        {
            "genre": pa.array(genre, pa.string()),
            "price": pa.array(price, pa.float64()),
            "in_stock": pa.array(stock, pa.bool_()),
        }
    )
    return x.astype(np.float32), users, table


X, USERS, TABLE = _data()
ATTRS = ItemAttributes.from_table(TABLE, SCHEMA)


def _build(name: str, folder: Path, milvus_uri: str, alias: str = "") -> VectorIndex:
    if name.startswith("milvus"):
        pytest.importorskip("pymilvus")
        from csmf.index.milvus import MilvusIndex, MilvusSpec, promote

        alias = name.replace("-", "_") + alias
        spec = MilvusSpec(milvus_uri, alias, **MILVUS_KINDS[name])
        built = MilvusIndex.build(X, TABLE, spec, progress=False)
        spec = IndexSpec.model_validate(built.save(folder))
        built.close()
        promote(spec)
    else:
        built = FaissIndex.build(X, FAISS_KINDS[name], progress=False)
        spec = IndexSpec.model_validate(built.save(folder))
    return open_index(spec, folder)  # what the service does: from the manifest section


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, request):
    """indexes(name) → the built index of that backend, opened from its manifest section (built
    once per module); indexes(name, fresh=True) → another one, for tests that write to it."""
    root = tmp_path_factory.mktemp("contract")
    cache: dict[str, VectorIndex] = {}

    def get(name: str, fresh: bool = False) -> VectorIndex:
        key = f"{name}-written" if fresh else name
        if key not in cache:
            if name.startswith("milvus-server"):  # started on first use only (or skips)
                uri = request.getfixturevalue("milvus_server").uri
            else:
                uri = str(root / "milvus.db")
            folder = root / key  # after a skip above, the next test may try again
            folder.mkdir()
            cache[key] = _build(name, folder, uri, "_written" if fresh else "")
        return cache[key]

    yield get
    for index in cache.values():
        index.close()


def _truth(q: np.ndarray, allowed: np.ndarray | None = None, exclude=()) -> tuple:
    """Brute force: (Q, k) best scores and rows among allowed, non-excluded rows."""
    scores = q.astype(np.float64) @ X.T.astype(np.float64)  # (Q, N)
    ok = np.ones(N, bool) if allowed is None else allowed.copy()
    ok[list(exclude)] = False
    scores[:, ~ok] = -np.inf
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(scores, rows, 1), rows


def _check(name: str, q: np.ndarray, scores, rows, allowed=None, exclude=(), min_recall=0.9):
    want_s, want_r = _truth(q, allowed, exclude)
    n_ok = int(np.isfinite(want_s[0]).sum())
    valid = rows >= 0
    got = rows[valid]
    if allowed is not None:
        assert allowed[got].all(), f"{name}: a result outside the filter"
    assert not set(got.tolist()) & set(exclude), f"{name}: an excluded row was returned"
    # every returned score is the exact inner product of its row
    exact = np.einsum("qd,qkd->qk", q, X[np.where(valid, rows, 0)])
    np.testing.assert_allclose(scores[valid], exact[valid], rtol=1e-5, atol=1e-4)
    recall = recall_with_ties(X, q, rows, want_s.astype(np.float32))
    if name in EXACT:
        assert (valid.sum(1) == n_ok).all()
        np.testing.assert_allclose(scores[:, :n_ok], want_s[:, :n_ok], rtol=1e-5, atol=1e-5)
        assert recall.min() * K >= n_ok - 1e-9, f"{name}: not the exact top-k"
    else:
        assert recall.mean() * K / n_ok >= min_recall, (name, recall.mean())


@pytest.mark.parametrize("name", BACKENDS)
def test_weighted_search(name, indexes):
    index = indexes(name)
    assert len(index) == N and index.dim == D
    assert index.capabilities.exact == (name in EXACT)
    for w in weight_grid(3):
        q = np.ascontiguousarray(USERS * slice_scale(w, SIZES), dtype=np.float32)
        scores, rows = index.search(q, K)
        assert scores.shape == rows.shape == (len(q), K)
        _check(name, q, scores, rows)


@pytest.mark.parametrize("name", BACKENDS)
def test_filters_and_exclusions_match_brute_force(name, indexes):
    index = indexes(name)
    q = np.ascontiguousarray(USERS[:10] * slice_scale((1, 1.8, 1.2), SIZES), dtype=np.float32)
    _, top = _truth(q[:1])
    exclude = top[0, ::2].tolist()  # half of the true top-k
    for obj in FILTERS:
        f = parse_filter(obj, SCHEMA)
        allowed = RowSet(ATTRS.mask(f))
        assert 0.1 * N < allowed.count < N  # not the selective regime: that is the next test
        for ex in ((), exclude):
            where = Where(filter=f, allowed=allowed, exclude=np.asarray(ex, np.int64))
            scores, rows = index.search(q, K, where)
            _check(name, q, scores, rows, allowed.mask, ex, min_recall=0.85)


def test_null_attributes_never_match_not_even_under_not():
    """Three-valued logic, as Milvus evaluates it (checked against Milvus in the test above)."""
    null_genre = np.array([g is None for g in TABLE.column("genre").to_pylist()])
    eq = ATTRS.mask(parse_filter({"field": "genre", "eq": "drama"}, SCHEMA))
    neq = ATTRS.mask(parse_filter({"not": {"field": "genre", "eq": "drama"}}, SCHEMA))
    assert not (eq | neq)[null_genre].any() and (eq | neq)[~null_genre].all()
    either = parse_filter(
        {"or": [{"field": "genre", "eq": "drama"}, {"field": "price", "gte": 0}]}, SCHEMA
    )
    assert ATTRS.mask(either)[null_genre].any()  # or: the non-null side decides


@pytest.mark.parametrize("name", ["ivf", "hnsw", "ivfpq", "flat"])
def test_selective_filter_falls_back_to_exact_search(name, indexes, tmp_path):
    index = indexes(name)
    rare = ATTRS.mask(parse_filter({"field": "price", "gt": 120}, SCHEMA))  # ~0.3 % of items
    allowed = RowSet(rare)
    assert 0 < allowed.count <= index.exact_below * N
    q = np.ascontiguousarray(USERS * slice_scale((1, 1.8, 1.2), SIZES), dtype=np.float32)
    scores, rows = index.search(q, K, Where(allowed=allowed))
    want_s, want_r = _truth(q, rare)
    n_ok = min(K, allowed.count)
    np.testing.assert_array_equal(rows[:, :n_ok], want_r[:, :n_ok])
    np.testing.assert_allclose(scores[:, :n_ok], want_s[:, :n_ok], rtol=1e-5, atol=1e-5)
    assert (rows[:, n_ok:] == -1).all()
    if name == "ivf":  # without the fallback, and without widening nprobe, the IVF scan starves
        below = index.exact_below
        index.exact_below, index.widen_filtered = 0.0, False
        try:
            _, ann = index.search(q, K, Where(allowed=allowed))
            index.widen_filtered = True  # nprobe / share: as many allowed candidates as unfiltered
            _, wide = index.search(q, K, Where(allowed=allowed))
        finally:
            index.exact_below, index.widen_filtered = below, True
        hit = recall_with_ties(X, q, ann, want_s.astype(np.float32)) * K / n_ok
        assert hit.mean() < 0.95
        hit = recall_with_ties(X, q, wide, want_s.astype(np.float32)) * K / n_ok
        assert hit.mean() > 0.99


@pytest.mark.parametrize("name", BACKENDS)
def test_stored_vectors_read_back(name, indexes):
    index = indexes(name)
    rows = np.array([5, 0, 2999, 5, 1234])
    np.testing.assert_allclose(index.vectors(rows), X[rows], rtol=1e-5, atol=1e-5)


def test_ivfpq_keeps_less_in_memory_and_needs_its_rerank(indexes):
    flat, pq = indexes("flat"), indexes("ivfpq")
    assert pq.stats()["bytes_per_item"] < flat.stats()["bytes_per_item"] / 2
    assert pq.stats()["exact_vectors_bytes"] == N * D * 4  # on disk, memory-mapped
    q = np.ascontiguousarray(USERS * slice_scale((1, 1.8, 1.2), SIZES), dtype=np.float32)
    want_s, _ = _truth(q)
    with_rr = recall_with_ties(X, q, pq.search(q, K)[1], want_s.astype(np.float32)).mean()
    pq.set_search_params({**pq.search_params, "rerank": 0})
    try:
        without = recall_with_ties(X, q, pq.search(q, K)[1], want_s.astype(np.float32)).mean()
    finally:
        pq.set_search_params({**pq.search_params, "rerank": 8})
    assert with_rr > without


def test_opq_ivfpq_round_trips_and_reranks_exactly(tmp_path):
    # OPQ trains an 8-bit PQ 50 times: keep it small, on one thread (OpenMP threads spin
    # against each other on a busy 2-core machine: 4 s, against 30 s with two, measured)
    x = X[:1000]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        built = FaissIndex.build(
            x, FaissSpec("ivfpq", nlist=8, nprobe=8, pq_m=4, pq_bits=6, opq=True, rerank=16), False
        )
    finally:
        faiss.omp_set_num_threads(threads)
    spec = IndexSpec.model_validate(built.save(tmp_path))
    assert spec.build_params["opq"] is True and spec.files == ["index.faiss", "vectors.npy"]
    index = open_index(spec, tmp_path)
    q = np.ascontiguousarray(USERS * slice_scale((0.3, 2.0, 0.7), SIZES), dtype=np.float32)
    scores, rows = index.search(q, K)
    truth, _ = exact_topk(x, q, K)
    np.testing.assert_allclose(
        scores, np.einsum("qd,qkd->qk", q, x[rows]), rtol=1e-5, atol=1e-4
    )  # re-ranked: exact scores
    assert recall_with_ties(x, q, rows, truth).mean() >= 0.9


def test_ivf_exact_below_follows_the_catalogue_and_is_recorded(tmp_path, monkeypatch):
    """IVF's default crossover is c·sqrt(nprobe/nlist) within [0.2 %, 5 %]: the exact search
    costs ∝ share·N, the widened one ∝ (nprobe/share)·(N/nlist). It is recorded as null (auto),
    recomputed for the loaded nprobe, and a configured value is kept as given."""
    from csmf.index.faiss import EXACT_BELOW, IVF_EXACT_C, auto_exact_below

    assert auto_exact_below("ivf", 32, 1265) == pytest.approx(IVF_EXACT_C * (32 / 1265) ** 0.5)
    assert auto_exact_below("ivf", 20, 4000) < auto_exact_below("ivf", 32, 1265) < 0.05
    assert auto_exact_below("ivf", 1, 10**6) == 0.002 and auto_exact_below("ivf", 16, 32) == 0.05
    assert auto_exact_below("hnsw") == EXACT_BELOW["hnsw"] == 0.10

    built = FaissIndex.build(X, FaissSpec("ivf", nlist=64, nprobe=1), progress=False)
    want = IVF_EXACT_C * (1 / 64) ** 0.5
    assert built.exact_below == pytest.approx(want)
    (tmp_path / "auto").mkdir()
    spec = IndexSpec.model_validate(built.save(tmp_path / "auto"))
    assert spec.exact_below is None  # auto: not frozen into the manifest
    loaded = open_index(spec, tmp_path / "auto")
    assert loaded.exact_below == pytest.approx(want)
    # A filter between the auto crossover and the old fixed 5 % takes the widened ANN path
    share = want * 1.5
    mask = np.zeros(N, bool)
    mask[:: int(1 / share)] = True
    assert want * N < mask.sum() <= 0.05 * N
    exact_calls = []
    monkeypatch.setattr(
        loaded, "_exact_search", lambda *a: exact_calls.append(a) or _truth(USERS[:2])
    )
    loaded.search(USERS[:2], K, Where(allowed=RowSet(mask)))
    assert not exact_calls
    loaded.set_search_params({"nprobe": 3})  # e.g. after tuning: the crossover follows nprobe
    assert loaded.exact_below == pytest.approx(IVF_EXACT_C * (3 / 64) ** 0.5)
    loaded.search(USERS[:2], K, Where(allowed=RowSet(mask)))  # now below it: exact
    assert len(exact_calls) == 1

    fixed = FaissIndex.build(X, FaissSpec("ivf", nlist=64, nprobe=2, exact_below=0.03), False)
    (tmp_path / "fixed").mkdir()
    spec = IndexSpec.model_validate(fixed.save(tmp_path / "fixed"))
    assert spec.exact_below == 0.03 and open_index(spec, tmp_path / "fixed").exact_below == 0.03


# -- item writes (the VectorIndex.upsert / delete seam), the same checks on every backend ----------

WRITE_BACKENDS = ["flat", "ivf", "milvus-flat", "milvus-server-flat", "milvus-server-ivf"]
APPEND = 300


def _attributes(rng, n: int) -> dict[str, np.ndarray]:
    """Item-table columns of n written rows: the build's types, nulls included."""
    genre = np.array(["action", "drama", "comedy", "horror", "docu"])[rng.integers(0, 5, n)]
    price = rng.gamma(2.0, 15.0, n)
    return {
        "genre": np.array([None if i % 11 == 0 else str(g) for i, g in enumerate(genre)], object),
        "price": np.where(np.arange(n) % 7 == 0, np.nan, price),
        "in_stock": np.array([None if i % 5 == 0 else bool(b) for i, b in enumerate(rng.random(n) < 0.5)], object),
    }  # fmt: skip


class Catalogue:
    """What a written index should hold: every row's vector, attributes and deleted flag (the
    caller's item table; filters are evaluated over it and AND-ed with "not deleted")."""

    def __init__(self) -> None:
        self.x = X.copy()
        self.cols = {c: TABLE.column(c).to_pylist() for c in SCHEMA}
        self.dead = np.zeros(N, bool)

    def upsert(self, rows, v, attrs=None):
        grow = int(rows.max()) + 1 - len(self.x)
        if grow > 0:
            self.x = np.concatenate([self.x, np.zeros((grow, D), np.float32)])
            self.dead = np.concatenate([self.dead, np.zeros(grow, bool)])
            for c in self.cols.values():
                c.extend([None] * grow)
        self.x[rows] = v
        self.dead[rows] = False
        for c, vals in (attrs or {}).items():
            for r, val in zip(rows.tolist(), vals.tolist(), strict=True):
                self.cols[c][r] = None if isinstance(val, float) and np.isnan(val) else val

    def attributes(self) -> ItemAttributes:
        types = {"genre": pa.string(), "price": pa.float64(), "in_stock": pa.bool_()}
        return ItemAttributes.from_table(
            pa.table({c: pa.array(v, types[c]) for c, v in self.cols.items()}), SCHEMA
        )

    def truth(self, q, allowed):
        s = q.astype(np.float64) @ self.x.T.astype(np.float64)
        s[:, ~allowed] = -np.inf
        rows = np.argsort(-s, axis=1, kind="stable")[:, :K]
        return np.take_along_axis(s, rows, 1), rows


@pytest.fixture(scope="module")
def written(indexes):
    """written(name) → (index, catalogue) after appends (in any order), replacements with new
    attributes, a replacement without attributes, deletes (twice: idempotent) and undeletes."""
    done: dict[str, tuple] = {}

    def get(name: str):
        if name in done:
            return done[name]
        index = indexes(name, fresh=True)
        if index.capabilities.writes == "none":
            pytest.skip(f"{name}: this index takes no item writes")
        rng = np.random.default_rng(5)
        ref = Catalogue()
        rows = rng.permutation(np.arange(N, N + APPEND))
        v = (rng.standard_normal((APPEND, D)) * 2 + 0.5).astype(np.float32)
        attrs = _attributes(rng, APPEND)
        index.upsert(rows, v, attrs)
        ref.upsert(rows, v, attrs)
        replace = rng.choice(N + APPEND, 200, replace=False)
        v, attrs = (rng.standard_normal((200, D)) * 2).astype(np.float32), _attributes(rng, 200)
        index.upsert(replace, v, attrs)
        ref.upsert(replace, v, attrs)
        keep = np.setdiff1d(np.arange(N + APPEND), replace)[:30]  # vectors only: attributes stay
        v = (rng.standard_normal((30, D)) * 2).astype(np.float32)
        index.upsert(keep, v)
        ref.upsert(keep, v)
        gone = rng.choice(N + APPEND, 250, replace=False)
        index.delete(gone)
        index.delete(gone[:40])  # idempotent
        ref.dead[gone] = True
        back = gone[:15]
        v = (rng.standard_normal((15, D)) * 2).astype(np.float32)
        attrs = _attributes(rng, 15)
        index.upsert(back, v, attrs)  # an upsert brings a deleted row back
        ref.upsert(back, v, attrs)
        done[name] = (index, ref)
        return done[name]

    return get


def _check_written(name, ref, q, scores, rows, allowed):
    want_s, _ = ref.truth(q, allowed)
    valid = rows >= 0
    assert allowed[rows[valid]].all(), f"{name}: a deleted, filtered-out or excluded row"
    exact = np.einsum("qd,qkd->qk", q, ref.x[np.where(valid, rows, 0)])
    np.testing.assert_allclose(scores[valid], exact[valid], rtol=1e-5, atol=1e-4)
    n_ok = min(K, int(allowed.sum()))
    recall = recall_with_ties(ref.x, q, rows, want_s.astype(np.float32)) * K / n_ok
    if name in EXACT | {"milvus-server-flat"}:
        assert (valid.sum(1) == n_ok).all()
        assert recall.min() >= 1 - 1e-9, f"{name}: not the exact top-k after writes"
    else:
        assert recall.mean() >= 0.85, (name, recall.mean())


@pytest.mark.parametrize("name", WRITE_BACKENDS)
def test_writes_keep_weighted_search_exact_over_the_live_rows(name, written):
    index, ref = written(name)
    assert len(index) == N + APPEND
    np.testing.assert_array_equal(index.deleted_rows(), np.flatnonzero(ref.dead))
    for w in weight_grid(3):
        q = np.ascontiguousarray(USERS * slice_scale(w, SIZES), dtype=np.float32)
        scores, rows = index.search(q, K)
        _check_written(name, ref, q, scores, rows, ~ref.dead)
    live = np.flatnonzero(~ref.dead)
    some = np.concatenate([live[:2], live[-3:]])  # built and appended rows
    np.testing.assert_allclose(index.vectors(some), ref.x[some], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", WRITE_BACKENDS)
def test_writes_keep_filters_and_exclusions(name, written):
    """Filters see written attributes (engines that filter by expression store them); a
    deleted row is never returned, whatever the filter; exclusions hold for written rows."""
    index, ref = written(name)
    attrs = ref.attributes()
    live = ~ref.dead
    q = np.ascontiguousarray(USERS[:10] * slice_scale((1, 1.8, 1.2), SIZES), dtype=np.float32)
    _, top = ref.truth(q[:1], live)
    exclude = np.asarray([*top[0, ::2].tolist(), N + 1, N + 3], np.int64)
    for obj in FILTERS:
        f = parse_filter(obj, SCHEMA)
        mask = attrs.mask(f) & live
        for ex in (np.zeros(0, np.int64), exclude):
            allowed = mask.copy()
            allowed[ex] = False
            where = Where(filter=f, allowed=RowSet(mask), exclude=ex)
            scores, rows = index.search(q, K, where)
            _check_written(name, ref, q, scores, rows, allowed)


@pytest.mark.parametrize("name", WRITE_BACKENDS)
def test_a_write_is_read_by_the_next_search_and_bad_writes_change_nothing(name, written):
    index, ref = written(name)
    n = len(index)
    q = np.ascontiguousarray(USERS[:1], dtype=np.float32)
    # the next search after an acknowledged write sees it (same client: Session consistency)
    hot = (q[0] / np.linalg.norm(q[0]) * 1e3).astype(np.float32)[None]
    row = np.array([n], np.int64)
    index.upsert(
        row, hot, {"genre": np.array(["drama"], object)} if name.startswith("milvus") else None
    )
    ref.upsert(
        row,
        hot,
        {
            "genre": np.array(["drama"], object),
            "price": np.array([np.nan]),
            "in_stock": np.array([None], object),
        },
    )
    assert index.search(q, 1)[1][0, 0] == n
    index.delete(row)
    ref.dead[n] = True
    assert n not in index.search(q, K)[1][0]
    bad = [
        (np.array([n + 5]), hot, "dense"),  # a gap before the new row
        (np.array([1, 1]), np.repeat(hot, 2, 0), "twice"),
        (np.array([2]), hot[:, :-1], "vectors must be"),
        (np.array([2]), np.full_like(hot, np.nan), "NaN"),
    ]  # fmt: skip
    for rows, v, match in bad:
        with pytest.raises(ItemWriteError, match=match):
            index.upsert(rows, v)
    with pytest.raises(ItemWriteError, match=f"row {n + 9} does not exist"):
        index.delete(np.array([n + 9]))
    if name.startswith("milvus"):
        with pytest.raises(ItemWriteError, match="unknown attribute column 'colour'"):
            index.upsert(np.array([2]), hot, {"colour": np.array(["red"], object)})
        with pytest.raises(ItemWriteError, match="row 2: attribute 'price' must be a number"):
            index.upsert(np.array([2]), hot, {"price": np.array(["cheap"], object)})
    assert len(index) == n + 1  # nothing above changed the index
    scores, rows = index.search(q, K)
    _check_written(name, ref, q, scores, rows, ~ref.dead)
