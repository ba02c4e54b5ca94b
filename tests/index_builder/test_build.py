"""End-to-end builds of every index type, the manifest contents, and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from csmf.bundle import (
    BUNDLE_FILES,
    INDEX_FILE,
    ITEM_ENCODER_FILE,
    MANIFEST_NAME,
    load_bundle,
    sha256_file,
)
from csmf.weights import dim_scale, slice_scale
from index_builder.build import build_bundle
from index_builder.cli import app
from index_builder.config import BuildConfig
from index_builder.encode import output_permutation

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("ivf", {}),
        # a random untrained ReLU tower is a hard case for HNSW on inner product (see
        # csmf.index.faiss); 0.8 is what this random model supports at ef=128
        ("hnsw", {"recall_floor": 0.8}),
        # 3 bytes of PQ code per item; the exact re-rank from the memory-mapped vectors restores
        # the recall the codes alone lose
        ("ivfpq", {"rerank": 8, "recall_floor": 0.9}),
    ],
)
def test_build_each_index_type(tiny_run, tmp_path, kind, extra):
    out, m = build_bundle(
        tiny_run, tmp_path / kind, BuildConfig(index=kind, **extra), progress=False
    )
    b = load_bundle(out)
    assert b.index_type == kind and m.index.type == kind and m.index.backend == "faiss"
    rc = m.recall_check
    assert rc.passed and rc.k == 50 and rc.queries == 60
    assert rc.bytes_per_item == m.index.bytes_per_item > 0
    assert [r.weights for r in rc.by_weights] == [
        [1.0, 1.8, 1.2],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 1.0],
    ]
    assert rc.min_recall == min(r.recall for r in rc.by_weights) >= rc.floor
    if kind == "ivf":
        assert m.index.search_params == {"nprobe": 32} == b.index.search_params
        assert m.index.build_params["nlist"] == 38  # min(4·sqrt(1500), 1500 // 39)
        assert b.index.index.nprobe == 32
        assert b.index.offset is None
    elif kind == "ivfpq":
        assert m.index.search_params == {"nprobe": 32, "rerank": 8}
        assert m.index.build_params["pq_m"] == 3 and m.index.build_params["pq_bits"] == 5
        assert m.index.files == ["index.faiss", "vectors.npy"] and "vectors.npy" in m.files
        assert rc.bytes_per_item < 12 * 4  # less than the float32 vectors themselves
    else:
        assert m.index.search_params == {"ef_search": 128}
        assert b.index.index.hnsw.efSearch == 128
        assert b.index.offset is not None  # auto-centred for HNSW; scores must still be exact
    q = b.encoder.cold_start()[None] * b.scale([1, 1.8, 1.2])
    scores, rows = b.search(q, 5)
    exact = q @ b.item_vectors(rows[0]).T
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)


def test_manifest_lists_every_file_with_checksums(flat_bundle):
    m = json.loads((flat_bundle / MANIFEST_NAME).read_text())
    assert sorted(m["files"]) == sorted((*BUNDLE_FILES, INDEX_FILE, ITEM_ENCODER_FILE))
    for name, rec in m["files"].items():
        assert rec["sha256"] == sha256_file(flat_bundle / name)
        assert rec["bytes"] == (flat_bundle / name).stat().st_size
    for key in (
        "model_version",
        "created_at",
        "objectives",
        "slice_sizes",
        "index",
        "item_count",
        "recall_check",
        "training",
        "snapshot",
        "build",
    ):
        assert key in m, key
    assert m["training"]["config"]["split"]["test_frac"] == 0.2
    assert len(m["model_version"]) == 16


def test_model_version_is_a_content_hash(tiny_run, flat_bundle, tmp_path):
    _, m = build_bundle(tiny_run, tmp_path / "again", BuildConfig(index="ivf"), progress=False)
    assert m.model_version == load_bundle(flat_bundle).model_version


def test_items_file_option(tiny_run, tiny_dataset, tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    items = pq.read_table(tiny_dataset / "items.parquet").slice(0, 300).drop_columns(["genres"])
    pacsv.write_csv(items, tmp_path / "items.csv")
    out, m = build_bundle(
        tiny_run,
        tmp_path / "b",
        BuildConfig(index="flat"),
        items=tmp_path / "items.csv",
        progress=False,
    )
    assert m.item_count == 300
    assert load_bundle(out).item_meta["title"][:2] == ["Item number 0", "Item number 1"]


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=40),
    st.lists(st.floats(0, 5), min_size=4, max_size=4),
)
def test_permutation_makes_slices_contiguous(owner, weights):
    """Permuting dims by owner turns the per-dim scale into contiguous per-objective slices."""
    owner = np.asarray(owner)
    perm, sizes = output_permutation(owner, 4)
    if not any(weights):
        weights = [1.0, 0, 0, 0]
    np.testing.assert_array_equal(dim_scale(weights, owner)[perm], slice_scale(weights, sizes))
    assert np.all(np.diff(owner[perm]) >= 0)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_build_and_inspect(tiny_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(
        app,
        ["build-index", "--run", str(tiny_run), "--out", str(out), "--index", "flat", "--quiet"],
    )
    assert r.exit_code == 0, r.output
    assert f"bundle {out}: 1500 items, 60 users, faiss flat" in r.output
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "model_version" in r.output and "OK: 5 files verified, bundle loads" in r.output
    (out / "items.parquet").write_bytes(b"garbage")
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 2
    assert "INVALID" in r.output and "items.parquet" in r.output


def test_cli_reports_errors_without_traceback(tmp_path):
    r = CliRunner().invoke(
        app, ["build-index", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "b")]
    )
    assert r.exit_code == 2
    assert "error: no checkpoint at" in r.output
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no bundle at" in r.output


def test_python_m_entry_point(flat_bundle, tmp_path):
    shutil.copytree(flat_bundle, tmp_path / "b")
    r = subprocess.run(
        [sys.executable, "-m", "index_builder.cli", "inspect", str(tmp_path / "b"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "OK: 5 files verified" in r.stdout


def test_build_with_tune_lowers_nprobe_and_records_the_search(tiny_run, tmp_path):
    cfg = BuildConfig(index="ivf", nprobe=32, tune=True, recall_floor=0.9, tune_margin=0.02)
    out, m = build_bundle(tiny_run, tmp_path / "tuned", cfg, progress=False)
    tuning = m.index.tuning
    nprobe = m.index.search_params["nprobe"]
    assert nprobe < 32 and load_bundle(out).index.search_params["nprobe"] == nprobe
    assert tuning["target"] == 0.92 and tuning["trace"]
    assert not tuning["disjoint_from_check"]  # 60 users: too few for a separate tuning sample
    passed = [t["nprobe"] for t in tuning["trace"] if t["min_recall"] >= 0.92]
    assert nprobe == min(passed)
    assert m.recall_check.passed and m.build["config"]["tune"] is True
