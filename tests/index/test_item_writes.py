"""Item writes through the VectorIndex seam on real FAISS indexes: after a mix of appends,
replacements, deletes and an undelete, weighted searches, filters and exclusions equal brute
force over the live rows (exact types and IVF with every list probed; HNSW within its recall and
never a deleted row), bad writes change nothing, searches run while writes land, and a compacted
copy answers what the written index answers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from csmf.errors import BundleError, ItemWriteError
from csmf.index import IndexSpec, RowSet, Where, open_index
from csmf.index.faiss import FaissIndex, FaissSpec
from csmf.weights import slice_scale
from index_builder.recall import recall_with_ties, weight_grid

N0, APPEND, D, SIZES, K = 2000, 400, 16, (6, 5, 5), 20
KINDS = {
    "flat": FaissSpec("flat"),
    "ivf": FaissSpec("ivf", nlist=16, nprobe=16),  # every list probed: exact
    "hnsw": FaissSpec("hnsw", hnsw_m=16, ef_search=256, centered=True),
}
EXACT = {"flat", "ivf"}


def _vectors(rng, n):
    centres = rng.standard_normal((30, D)) * 2
    return (centres[rng.integers(0, 30, n)] + rng.standard_normal((n, D)) * 0.7 + 0.5).astype(
        np.float32
    )


class Reference:
    """What the index should hold: every row's current vector and whether it is deleted."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x.copy()
        self.dead = np.zeros(len(x), bool)

    def upsert(self, rows, v):
        n = max(len(self.x), int(rows.max()) + 1)
        if n > len(self.x):
            self.x = np.concatenate([self.x, np.zeros((n - len(self.x), D), np.float32)])
            self.dead = np.concatenate([self.dead, np.zeros(n - len(self.dead), bool)])
        self.x[rows] = v
        self.dead[rows] = False

    def delete(self, rows):
        self.dead[rows] = True

    def truth(self, q, allowed=None, exclude=()):
        s = q.astype(np.float64) @ self.x.T.astype(np.float64)
        ok = ~self.dead if allowed is None else (~self.dead & allowed)
        ok = ok.copy()
        ok[list(exclude)] = False
        s[:, ~ok] = -np.inf
        rows = np.argsort(-s, axis=1, kind="stable")[:, :K]
        return np.take_along_axis(s, rows, 1), rows, ok


def _written(name: str, tmp_path) -> tuple[FaissIndex, Reference]:
    """A bundle-loaded index after appends, replacements, deletes and an undelete."""
    rng = np.random.default_rng(3)
    x = _vectors(rng, N0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    built = FaissIndex.build(x, KINDS[name], progress=False)
    spec = IndexSpec.model_validate(built.save(tmp_path))
    index = open_index(spec, tmp_path)
    ref = Reference(x)
    new = _vectors(rng, APPEND)
    rows = rng.permutation(np.arange(N0, N0 + APPEND))  # new rows in any order
    index.upsert(rows, new[rows - N0])
    ref.upsert(rows, new[rows - N0])
    replace = rng.choice(N0 + APPEND, 150, replace=False)
    v = _vectors(rng, 150)
    index.upsert(replace, v)
    ref.upsert(replace, v)
    gone = rng.choice(N0 + APPEND, 300, replace=False)
    index.delete(gone)
    index.delete(gone[:50])  # idempotent
    ref.delete(gone)
    back = gone[:20]
    v = _vectors(rng, 20)
    index.upsert(back, v)  # an upsert brings a deleted row back
    ref.upsert(back, v)
    return index, ref


@pytest.fixture(scope="module", params=list(KINDS))
def written(request, tmp_path_factory):
    index, ref = _written(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, index, ref


def _check(name, index, ref, q, scores, rows, allowed=None, exclude=()):
    want_s, _, ok = ref.truth(q, allowed, exclude)
    valid = rows >= 0
    got = rows[valid]
    assert ok[got].all(), f"{name}: a deleted, filtered-out or excluded row was returned"
    exact = np.einsum("qd,qkd->qk", q, ref.x[np.where(valid, rows, 0)])
    np.testing.assert_allclose(scores[valid], exact[valid], rtol=1e-4, atol=1e-3)
    n_ok = min(K, int(ok.sum()))
    recall = recall_with_ties(ref.x, q, rows, want_s.astype(np.float32)) * K / n_ok
    if name in EXACT:
        assert (valid.sum(1) == n_ok).all()
        assert recall.min() >= 1 - 1e-9, f"{name}: not the exact top-k after writes"
    else:
        assert recall.mean() >= 0.9, (name, recall.mean())


def test_capabilities_say_how_writes_land():
    x = _vectors(np.random.default_rng(0), 300)
    kinds = {
        k: FaissIndex.build(x, s, progress=False).capabilities.writes for k, s in KINDS.items()
    }
    assert kinds == {"flat": "native", "ivf": "native", "hnsw": "tombstone"}
    pq = FaissIndex.build(x, FaissSpec("ivfpq", nlist=4, pq_m=4, pq_bits=4), progress=False)
    assert pq.capabilities.writes == "none"
    with pytest.raises(ItemWriteError, match="does not take item writes"):
        pq.upsert(np.array([0]), x[:1])


def test_weighted_search_is_exact_over_the_live_rows(written):
    name, index, ref = written
    assert len(index) == N0 + APPEND
    assert index.stats()["items"] == int((~ref.dead).sum())
    np.testing.assert_array_equal(index.deleted_rows(), np.flatnonzero(ref.dead))
    # HNSW keeps dead nodes (300 deleted, 150 + 20 replaced) until a compaction; the others none
    share = index.tombstone_share()
    assert (share > 0.15) if name == "hnsw" else share == 0.0
    users = np.random.default_rng(9).standard_normal((30, D)).astype(np.float32)
    for w in weight_grid(3):
        q = np.ascontiguousarray(users * slice_scale(w, SIZES), dtype=np.float32)
        scores, rows = index.search(q, K)
        _check(name, index, ref, q, scores, rows)


def test_filters_and_exclusions_hold_for_written_rows(written):
    name, index, ref = written
    rng = np.random.default_rng(11)
    q = np.ascontiguousarray(
        rng.standard_normal((10, D)) * slice_scale((1, 1.8, 1.2), SIZES), dtype=np.float32
    )
    n = len(ref.x)
    wide = rng.random(n) < 0.5  # the ANN path with a bitmap selector
    rare = np.zeros(n, bool)  # the exact fallback: written and deleted rows among them
    rare[rng.choice(n, 40, replace=False)] = True
    rare[N0 : N0 + 10] = True
    _, top, _ = ref.truth(q[:1], wide)
    exclude = top[0, ::2].tolist() + [N0 + 1, N0 + 3]
    for mask in (wide, rare):
        allowed = RowSet(mask)
        for ex in ((), exclude):
            where = Where(allowed=allowed, exclude=np.asarray(ex, np.int64))
            scores, rows = index.search(q, K, where)
            _check(name, index, ref, q, scores, rows, mask, ex)
    where = Where(exclude=np.asarray(exclude, np.int64))
    scores, rows = index.search(q, K, where)
    _check(name, index, ref, q, scores, rows, None, exclude)


def test_written_vectors_read_back(written):
    name, index, ref = written
    live = np.flatnonzero(~ref.dead)
    np.testing.assert_allclose(index.vectors(live), ref.x[live], rtol=1e-5, atol=1e-4)
    dead = np.flatnonzero(ref.dead)[:5]
    assert not index.vectors(dead).any()  # a row deleted after its search reads as zeros


def test_bad_writes_change_nothing(written):
    name, index, ref = written
    q = np.random.default_rng(5).standard_normal((4, D)).astype(np.float32)
    before = index.search(q, K)
    n = len(index)
    bad = [
        (lambda: index.upsert(np.array([n + 1]), np.ones((1, D))), f"dense from {n}"),
        (lambda: index.upsert(np.array([3]), np.ones((1, D + 1))), "must be \\(1, 16\\)"),
        (lambda: index.upsert(np.array([3, 4]), np.full((2, D), np.nan)), "row 3 has a NaN"),
        (lambda: index.upsert(np.array([3, 3]), np.ones((2, D))), "row 3 appears twice"),
        (lambda: index.upsert(np.array(["a"]), np.ones((1, D))), "integer"),
        (lambda: index.delete(np.array([n + 5])), f"row {n + 5} does not exist"),
    ]
    for call, msg in bad:
        with pytest.raises(ItemWriteError, match=msg):
            call()
    assert len(index) == n
    after = index.search(q, K)
    np.testing.assert_array_equal(before[1], after[1])
    with pytest.raises(BundleError, match="compact"):
        index.save(Path("unused"))


def test_searches_run_while_writes_land(tmp_path):
    for name in KINDS:
        index, ref = _written(name, tmp_path / name)
        stop, errors = threading.Event(), []
        q = np.random.default_rng(1).standard_normal((8, D)).astype(np.float32)

        def search(index=index, stop=stop, q=q, errors=errors):
            while not stop.is_set():
                try:
                    _, rows = index.search(q, K)
                    assert (rows < len(index)).all()
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=search) for _ in range(2)]
        for t in threads:
            t.start()
        rng = np.random.default_rng(2)
        for _ in range(30):
            n = len(index)
            rows = np.concatenate([rng.choice(n, 5, replace=False), np.arange(n, n + 5)])
            v = _vectors(rng, 10)
            index.upsert(rows, v)
            ref.upsert(rows, v)
            gone = rng.choice(len(index), 5, replace=False)
            index.delete(gone)
            ref.delete(gone)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        scores, rows = index.search(q, K)
        _check(name, index, ref, q, scores, rows)


def test_compaction_answers_what_the_written_index_answers(written, tmp_path):
    name, index, ref = written
    live = np.flatnonzero(~ref.dead)
    fresh = index.compacted(live)
    assert len(fresh) == len(live) and fresh.deleted_rows().size == 0
    spec = IndexSpec.model_validate(
        fresh.save(tmp_path)
    )  # a compacted index saves like a built one
    loaded = open_index(spec, tmp_path)
    q = np.random.default_rng(8).standard_normal((20, D)).astype(np.float32)
    s1, r1 = index.search(q, K)
    s2, r2 = loaded.search(q, K)
    mapped = np.where(r2 >= 0, live[np.maximum(r2, 0)], -1)
    if name in EXACT:
        np.testing.assert_array_equal(mapped, r1)
        np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-4)
    else:
        want_s, _, _ = ref.truth(q)
        recall = recall_with_ties(ref.x, q, mapped, want_s.astype(np.float32))
        assert recall.mean() >= 0.9
        assert loaded.stats().get("tombstone_share") is None
