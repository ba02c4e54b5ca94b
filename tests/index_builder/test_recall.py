"""The weighted recall check and its floor."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from csmf.index.faiss import FaissIndex, FaissSpec, default_nlist
from index_builder.build import build_bundle
from index_builder.config import BuildConfig
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
    index = FaissIndex.build(x, cfg.faiss_spec(), progress=False)
    with pytest.raises(
        RecallFloorError, match=r"below the floor 0\.95 .*--nprobe (\d+) reaches"
    ) as e:
        check_recall(index, x, users, (6, 5, 5), 50, 0.95, weight_grid(3))
    assert "No bundle was published" in str(e.value)
    assert faiss.extract_index_ivf(index.index).nprobe == 1  # probing restored the configured value
    assert index.search_params == {"nprobe": 1}
    good = BuildConfig(index="ivf", nlist=64, nprobe=32)
    index = FaissIndex.build(x, good.faiss_spec(), progress=False)
    report = check_recall(index, x, users, (6, 5, 5), 50, 0.95, weight_grid(3))
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
    index = FaissIndex.build(x, FaissSpec("ivf", nlist=64, nprobe=64), progress=False)
    sizes, grid = [4, 4, 4], weight_grid(3)
    params, trace = tune_search_params(index, x, users, sizes, 20, target, grid)
    chosen = params["nprobe"]
    assert index.index.nprobe == chosen <= 64 and index.search_params == params
    assert len(trace) <= 6  # bisection, not a scan of the ladder

    def recall_at(v: int) -> float:
        index.set_search_params({"nprobe": v})
        return weighted_recall(index, x, users, sizes, 20, grid)["min_recall"]

    assert recall_at(chosen) >= target
    lower = [v for v in TUNE_LADDER if v < chosen]
    if lower:
        assert recall_at(lower[-1]) < target  # the next rung down misses: smallest passing rung
    assert 1 < chosen < 64  # neither knob extreme: the test exercises the search


def test_tuning_never_raises_the_configured_value_and_leaves_flat_alone():

    x = _blobs(3000, 8, 2)
    users = _blobs(50, 8, 3)
    index = FaissIndex.build(x, FaissSpec("ivf", nlist=32, nprobe=4), progress=False)
    grid = weight_grid(2)
    params, _ = tune_search_params(index, x, users, [4, 4], 20, 1.01, grid)
    assert params == {"nprobe": 4} and index.index.nprobe == 4  # unreachable target: the cap
    flat = FaissIndex.build(x, FaissSpec("flat"), progress=False)
    assert tune_search_params(flat, x, users, [4, 4], 20, 0.99, grid) == ({}, [])
