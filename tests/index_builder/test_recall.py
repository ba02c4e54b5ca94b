"""The weighted recall check and its floor."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index_builder.build import build_bundle
from index_builder.config import BuildConfig
from index_builder.faiss_index import build_faiss_index, default_nlist
from index_builder.recall import (
    TUNE_LADDER,
    RecallFloorError,
    check_recall,
    recall_with_ties,
    tune_search_params,
    weight_grid,
    weighted_recall,
)


def test_weight_grid_generalises_the_cascade():
    assert weight_grid(3) == [
        (1.0, 1.8, 1.2),
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
        (1.0, 1.0, 1.0),
    ]
    assert weight_grid(2) == [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
    assert weight_grid(1) == [(1.0,)]


def test_default_nlist_fits_tiny_and_large_catalogues():
    assert default_nlist(10) == 1
    assert default_nlist(1500) == 38
    assert default_nlist(1_000_000) == 4000


def test_recall_allows_ties_and_counts_missing_results():
    vectors = np.array([[1.0, 0], [1.0, 0], [0.5, 0], [0, 1.0]], np.float32)
    q = np.array([[1.0, 0]], np.float32)
    exact = np.array([[1.0, 1.0]], np.float32)  # top-2 scores: items 0 and 1 tie
    assert recall_with_ties(vectors, q, np.array([[1, 0]]), exact)[0] == 1.0
    assert recall_with_ties(vectors, q, np.array([[0, 2]]), exact)[0] == 0.5
    assert recall_with_ties(vectors, q, np.array([[0, -1]]), exact)[0] == 0.5


def _clustered(n=4000, d=16, clusters=64, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * 3
    x = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) * 0.3
    users = rng.standard_normal((200, d))
    return x.astype(np.float32), users.astype(np.float32)


def test_bad_ivf_params_fail_with_a_measured_suggestion():
    x, users = _clustered()
    cfg = BuildConfig(index="ivf", nlist=64, nprobe=1)
    index, info = build_faiss_index(x, cfg, progress=False)
    with pytest.raises(
        RecallFloorError, match=r"below the floor 0\.95 .*--nprobe (\d+) reaches"
    ) as e:
        check_recall(
            index, "ivf", info["search_params"], x, users, (6, 5, 5), 50, 0.95, weight_grid(3)
        )
    assert "No bundle was published" in str(e.value)
    assert faiss.extract_index_ivf(index).nprobe == 1  # probing restored the configured value
    good = BuildConfig(index="ivf", nlist=64, nprobe=32)
    index, info = build_faiss_index(x, good, progress=False)
    report = check_recall(
        index, "ivf", info["search_params"], x, users, (6, 5, 5), 50, 0.95, weight_grid(3)
    )
    assert report["passed"] and report["min_recall"] >= 0.95


def test_build_below_floor_publishes_nothing(tiny_run, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(RecallFloorError, match="--nprobe"):
        build_bundle(tiny_run, out, BuildConfig(index="ivf", nlist=38, nprobe=1), progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def _blobs(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    return (centres[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("target", [0.9, 0.97])
def test_tuning_picks_the_smallest_ladder_nprobe_that_reaches_the_target(target):

    x = _blobs(6000, 12, 0)
    users = _blobs(200, 12, 1)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(12), 12, 64, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    sizes, grid = [4, 4, 4], weight_grid(3)
    params, trace = tune_search_params(
        index, "ivf", {"nprobe": 64}, x, users, sizes, 20, target, grid
    )
    chosen = params["nprobe"]
    assert index.nprobe == chosen <= 64
    assert len(trace) <= 6  # bisection, not a scan of the ladder

    def recall_at(v: int) -> float:
        index.nprobe = v
        return weighted_recall(index, x, users, sizes, 20, grid)["min_recall"]

    assert recall_at(chosen) >= target
    lower = [v for v in TUNE_LADDER if v < chosen]
    if lower:
        assert recall_at(lower[-1]) < target  # the next rung down misses: smallest passing rung
    assert 1 < chosen < 64  # neither knob extreme: the test exercises the search


def test_tuning_never_raises_the_configured_value_and_leaves_flat_alone():

    x = _blobs(3000, 8, 2)
    users = _blobs(50, 8, 3)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 32, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    grid = weight_grid(2)
    params, _ = tune_search_params(index, "ivf", {"nprobe": 4}, x, users, [4, 4], 20, 1.01, grid)
    assert params == {"nprobe": 4} and index.nprobe == 4  # unreachable target: the cap
    flat = faiss.IndexFlatIP(8)
    assert tune_search_params(flat, "flat", {}, x, users, [4, 4], 20, 0.99, grid) == ({}, [])
