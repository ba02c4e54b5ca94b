"""The weighted recall check and its floor."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index_builder.build import build_bundle
from index_builder.config import BuildConfig
from index_builder.faiss_index import build_faiss_index, default_nlist
from index_builder.recall import RecallFloorError, check_recall, recall_with_ties, weight_grid


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
