"""Synthetic cascade generator: invariants, determinism, streaming, ground truth, CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from csmf.errors import ConfigError
from csmf.features import FeatureSpec
from trainer.data.cli import app
from trainer.data.dataset import load_dataset, split_by_time
from trainer.data.synthetic import (
    SyntheticConfig,
    generate_synthetic,
    load_truth,
    true_scores,
)

SPEC = FeatureSpec.from_dict(
    {
        "user": {
            "fields": [
                {"name": "segment", "kind": "categorical"},
                {"name": "region", "kind": "categorical"},
                {"name": "age", "kind": "numeric"},
            ]
        },
        "item": {
            "fields": [
                {"name": "topic", "kind": "categorical"},
                {"name": "price_bucket", "kind": "categorical"},
                {"name": "tags", "kind": "multi_hot"},
                {"name": "quality", "kind": "numeric"},
            ]
        },
        "display": ["title"],
    }
)
TINY = SyntheticConfig(users=50, items=200, exposures=6_000, seed=3, chunk_size=1_000)


def _np(table: pa.Table, col: str) -> np.ndarray:
    return table[col].to_numpy()


def test_loads_with_a_full_feature_spec(small_synthetic, small_config):
    ds = load_dataset(small_synthetic, SPEC)
    assert ds.meta["name"] == "synthetic"
    assert ds.counts() == {k: ds.meta["counts"][k] for k in ds.counts()}
    assert ds.users.num_rows == small_config.users
    assert ds.items.num_rows == small_config.items
    assert ds.events.num_rows == small_config.exposures


def test_cascade_and_sparsity(small_synthetic):
    ds = load_dataset(small_synthetic)
    clicked, converted = _np(ds.events, "clicked"), _np(ds.events, "converted")
    assert not (converted & ~clicked).any(), "converted must imply clicked"
    n_exp, n_click, n_conv = len(clicked), int(clicked.sum()), int(converted.sum())
    assert n_exp > n_click > n_conv > 0
    assert 0.05 < n_click / n_exp < 0.2  # target ctr 0.1
    assert 0.04 < n_conv / n_click < 0.25  # target cvr 0.1


def test_timestamps_increase_and_split_by_time_works(small_synthetic):
    ds = load_dataset(small_synthetic)
    ts = _np(ds.events, "timestamp")
    assert (np.diff(ts) >= 0).all()
    split = split_by_time(ds.events)
    assert len(split.test) > 0.15 * ds.events.num_rows


def test_streams_multiple_parts(small_synthetic):
    parts = sorted(p.name for p in (small_synthetic / "events").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_candidates_are_never_exposed_in_their_request(small_synthetic, small_config):
    ds = load_dataset(small_synthetic)
    assert ds.candidates is not None and ds.candidates.num_rows > 0

    def pairs(table: pa.Table) -> list[tuple[int, int]]:
        return list(
            zip(_np(table, "request_id").tolist(), _np(table, "item_id").tolist(), strict=True)
        )

    shown, cand = set(pairs(ds.events)), pairs(ds.candidates)
    assert not shown.intersection(cand)
    assert len(set(cand)) == len(cand), "candidates of a request are distinct"
    per_request = np.bincount(_np(ds.candidates, "request_id"))
    assert per_request.max() <= small_config.candidates_per_request


def test_a_request_exposes_an_item_once(small_synthetic):
    ds = load_dataset(small_synthetic)
    pairs = np.stack([_np(ds.events, "request_id"), _np(ds.events, "item_id")], axis=1)
    assert len(np.unique(pairs, axis=0)) == len(pairs)


def _tables(root):
    ds = load_dataset(root)
    return ds.events, ds.users, ds.items, ds.candidates


def test_same_seed_same_data_regardless_of_chunk_size(tmp_path):
    cfg = dataclasses.replace(TINY, candidates_per_request=2)
    generate_synthetic(cfg, tmp_path / "a")
    generate_synthetic(dataclasses.replace(cfg, chunk_size=100_000), tmp_path / "b")
    assert len(list((tmp_path / "a" / "events").iterdir())) == 6
    assert len(list((tmp_path / "b" / "events").iterdir())) == 1
    for a, b in zip(_tables(tmp_path / "a"), _tables(tmp_path / "b"), strict=True):
        assert a.equals(b)
    truth_a, truth_b = load_truth(tmp_path / "a"), load_truth(tmp_path / "b")
    for o in ("exposure", "click", "conversion"):
        assert np.array_equal(truth_a.item[o], truth_b.item[o])
        assert truth_a.bias[o] == truth_b.bias[o]


def test_different_seed_different_data(tmp_path):
    generate_synthetic(TINY, tmp_path / "a")
    generate_synthetic(dataclasses.replace(TINY, seed=4), tmp_path / "b")
    a, b = _tables(tmp_path / "a"), _tables(tmp_path / "b")
    assert not a[0].equals(b[0])
    assert not a[2].equals(b[2])


def test_exact_exposure_count_when_requests_do_not_divide(tmp_path):
    cfg = dataclasses.replace(TINY, exposures=1_003, exposures_per_request=4)
    counts = generate_synthetic(cfg, tmp_path)
    assert counts["exposures"] == 1_003 == load_dataset(tmp_path).events.num_rows
    assert counts["requests"] == 251


def test_conflict_controls_how_far_objectives_are_apart(tmp_path):
    generate_synthetic(dataclasses.replace(TINY, conflict=0.0), tmp_path / "same")
    generate_synthetic(dataclasses.replace(TINY, conflict=1.0), tmp_path / "apart")
    same, apart = load_truth(tmp_path / "same"), load_truth(tmp_path / "apart")
    assert np.allclose(same.user["click"], same.user["exposure"])
    assert np.allclose(same.item["conversion"], same.item["exposure"])

    def corr(t, a, b):
        return np.corrcoef(t.user[a].ravel(), t.user[b].ravel())[0, 1]

    assert abs(corr(apart, "exposure", "click")) < 0.2
    assert abs(corr(apart, "click", "conversion")) < 0.2


def test_true_scores_match_the_generated_data(small_synthetic, small_config):
    ds = load_dataset(small_synthetic)
    truth = load_truth(small_synthetic)
    users, items = _np(ds.events, "user_id"), _np(ds.events, "item_id")
    clicked = _np(ds.events, "clicked")
    rows = np.unique(users)

    exposure = true_scores(truth, rows, "exposure")
    assert exposure.shape == (len(rows), small_config.items) and exposure.dtype == np.float32
    np.testing.assert_allclose(np.exp(exposure.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-4)

    # exposed items sit high in the oracle's exposure ranking: mean percentile well above 0.5
    user_row = np.searchsorted(rows, users)
    rank = exposure.argsort(axis=1).argsort(axis=1) / (exposure.shape[1] - 1)
    assert rank[user_row, items].mean() > 0.8

    # P(click | exposure) is calibrated: predicted clicks ≈ observed clicks
    p_click = np.exp(true_scores(truth, rows, "click", conditional=True))[user_row, items]
    assert abs(p_click.sum() / clicked.sum() - 1) < 0.1
    assert p_click[clicked].mean() > 1.5 * p_click[~clicked].mean()

    # joint scores decompose: click = exposure + log P(click | exposure)
    click = true_scores(truth, rows[:5], "click")
    cond = true_scores(truth, rows[:5], "click", conditional=True)
    np.testing.assert_allclose(click, exposure[:5] + cond, rtol=1e-5, atol=1e-4)
    conv = true_scores(truth, rows[:5], "conversion")
    conv_cond = true_scores(truth, rows[:5], "conversion", conditional=True)
    np.testing.assert_allclose(conv, click + conv_cond, rtol=1e-5, atol=1e-4)
    assert (conv_cond <= 0).all()


def test_config_errors_quote_the_value():
    with pytest.raises(ConfigError, match=r"conflict must be in \[0, 1\], got 1.5"):
        SyntheticConfig(users=1, items=2, exposures=1, conflict=1.5)
    with pytest.raises(ConfigError, match="candidates_per_request must be in .* got 99"):
        SyntheticConfig(users=1, items=2, exposures=1, candidates_per_request=99)
    with pytest.raises(ConfigError, match="objective must be one of"):
        true_scores(None, np.arange(1), "purchase")


def test_cli_synthetic_writes_and_summarises(tmp_path):
    out = tmp_path / "syn"
    args = ["synthetic", "--users", "40", "--items", "100", "--exposures", "3000", "--seed", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--candidates-per-request", "2"])
    assert result.exit_code == 0, result.output
    counts = load_dataset(out).meta["counts"]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"wrote synthetic to {out}: 40 users, 100 items, 3,000 exposures")
    assert f"{counts['conversions']:,} conversions" in summary


def test_cli_bad_option_is_an_error_line_and_exit_2(tmp_path):
    args = ["synthetic", "--users", "4", "--items", "10", "--exposures", "10", "--conflict", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "error: conflict must be in [0, 1], got 2.0" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_does_not_import_torch():
    code = "import sys, trainer.data.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_fourth_label_changes_nothing_else(tmp_path):
    """--cart adds 'carted' (a part of the clicks, near the target rate) from its own random
    stream: every other column is the data cart = 0 generates."""
    generate_synthetic(TINY, tmp_path / "plain")
    generate_synthetic(dataclasses.replace(TINY, cart=0.3), tmp_path / "cart")
    plain = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "plain" / "events").iterdir())
    )
    cart = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "cart" / "events").iterdir())
    )
    assert cart.drop_columns(["carted"]).equals(plain)
    carted, clicked = cart["carted"].to_numpy(), cart["clicked"].to_numpy()
    assert not (carted & ~clicked).any()
    assert 0.2 < carted.sum() / clicked.sum() < 0.4
    with pytest.raises(ConfigError, match="cart"):
        dataclasses.replace(TINY, cart=1.5)
