"""Honest benchmark mechanics: the per-run cache key covers the resolved config, the
dataset's content, the method, the seed and the code; runs in their own process report their
own time and peak memory."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bench.harness import cache
from bench.harness.cache import (
    bench_fingerprint,
    cache_key,
    code_version,
    holds,
    key_of,
    remember,
    result_code_files,
    source_key,
)
from bench.harness.cli import app
from csmf.checkpoint import dataset_files, dataset_fingerprint
from trainer.config import load_config


def _bench(data, config, out, cache, *extra):
    args = ["quality", "--data", str(data), "--config", str(config), "--seeds", "1"]
    args += ["--out", str(out), "--cache", str(cache), *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / f"quality-{data.resolve().name}.json").read_text())


def test_key_changes_with_config_dataset_method_seed(tiny_config_path, tiny_data, tmp_path):
    cfg = load_config(tiny_config_path)
    fp = bench_fingerprint(tiny_data)
    assert fp == dataset_fingerprint(dataset_files(tiny_data))  # training's, the one function
    key, parts = cache_key(cfg, fp, "csmf", 0)
    assert parts["config"] == cfg.to_dict() and parts["dataset"] == fp
    assert cache_key(load_config(tiny_config_path), fp, "csmf", 0)[0] == key  # stable
    other = load_config(tiny_config_path, ["loss.temperature=0.3"])
    assert cache_key(other, fp, "csmf", 0)[0] != key
    assert cache_key(cfg, fp, "sep", 0)[0] != key
    assert cache_key(cfg, fp, "csmf", 1)[0] != key
    copy = shutil.copytree(tiny_data, tmp_path / "data")
    assert bench_fingerprint(copy) == fp  # content, not location
    (copy / "dataset.json").write_text('{"created_at": "later"}')  # metadata is not content
    assert bench_fingerprint(copy) == fp
    (copy / "truth.npz").write_bytes(b"ground truth")  # what the oracle method reads
    with_truth = bench_fingerprint(copy)
    assert with_truth != fp and dataset_fingerprint(dataset_files(copy)) == fp
    events = pq.read_table(copy / "events.parquet")
    pq.write_table(events.slice(1), copy / "events.parquet")
    assert bench_fingerprint(copy) not in (fp, with_truth)
    assert cache_key(cfg, bench_fingerprint(copy), "csmf", 0)[0] != key


def test_code_version_covers_result_code_not_presentation():
    csmf_files = result_code_files("csmf")
    cf_files = result_code_files("ease-click")
    assert "trainer/cascade.py" in csmf_files and "trainer/losses.py" in csmf_files
    assert "trainer/cf_baselines.py" in cf_files and "trainer/cf_baselines.py" not in csmf_files
    assert "bench/harness/cli.py" not in cf_files and "bench/harness/run.py" in csmf_files
    assert code_version("csmf")["source"] != code_version("ease-click")["source"]
    assert code_version("csmf") == code_version("sep")  # same code, same version


def test_second_run_hits_cache_and_changed_set_reruns(tiny_config_path, tiny_data, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = ("--methods", "ease-click,popularity", "--no-isolate")
    first = _bench(tiny_data, tiny_config_path, out, cache, *base)
    assert first["cache"] == {"folder": str(cache), "hits": 0, "runs": 2}
    assert first["hyperparameters"]["ease-click"]["per_seed"][0]["params"]["lambda"] > 0
    again = _bench(tiny_data, tiny_config_path, out, cache, *base)
    assert again["cache"]["hits"] == 2 and again["metrics"] == first["metrics"]
    changed = _bench(tiny_data, tiny_config_path, out, cache, *base, "--set", "eval.n=5")
    assert changed["cache"]["hits"] == 0
    assert changed["n"] == 5 and changed["metrics"] != first["metrics"]
    assert "--set eval.n=5" in changed["command"] and "--config" in changed["command"]
    assert changed["resolved_config"]["eval"]["n"] == 5
    # an edited config file with the same values hits; a changed value re-runs
    cfg2 = tmp_path / "same.toml"
    cfg2.write_text(tiny_config_path.read_text() + "\n# a comment\n")
    assert _bench(tiny_data, cfg2, out, cache, *base)["cache"]["hits"] == 2
    cfg2.write_text(tiny_config_path.read_text().replace("lr = 0.01", "lr = 0.02"))
    assert _bench(tiny_data, cfg2, out, cache, *base)["cache"]["hits"] == 0


@pytest.mark.slow
def test_isolated_run_measures_memory_and_matches_in_process(tiny_config_path, tiny_data, tmp_path):
    iso = _bench(
        tiny_data, tiny_config_path, tmp_path / "a", tmp_path / "ca", "--methods", "ease-click"
    )
    local = _bench(
        tiny_data, tiny_config_path, tmp_path / "b", tmp_path / "cb",
        "--methods", "ease-click", "--no-isolate",
    )  # fmt: skip
    assert iso["metrics"] == local["metrics"]  # deterministic method: same numbers either way
    cost = iso["training_cost"]["ease-click"]
    assert cost["peak_rss_mb"][0] >= cost["peak_extra_mb"][0] >= 0.0
    assert cost["peak_rss_mb"][0] > 50  # a real process with numpy/torch loaded
    assert "VmHWM" in cost["memory_measured"] or "ru_maxrss" in cost["memory_measured"]
    assert local["training_cost"]["ease-click"]["peak_rss_mb"] is None  # not measured in-process
    assert cost["train_seconds"][0] > 0 and cost["tune_seconds"][0] > 0
    md = (tmp_path / "a" / f"quality-{tiny_data.resolve().name}.md").read_text()
    assert "| ease-click |" in md and "lambda=" in md and "peak extra MB" in md


def test_a_run_folder_is_reused_only_for_the_same_parts(tmp_path):
    parts = {"code": "abc", "seed": 0, "sets": ["train.epochs=2"]}
    same = dict(reversed(parts.items()))
    assert not holds(tmp_path, parts)
    remember(tmp_path, parts)
    assert holds(tmp_path, parts) and holds(tmp_path, same)
    assert not holds(tmp_path, {**parts, "seed": 1})
    assert not holds(tmp_path, {**parts, "sets": []})
    assert key_of(parts) == key_of(same) != key_of({**parts, "seed": 1})


def test_source_key_follows_every_edit_of_the_packages(tmp_path, monkeypatch):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    module = tmp_path / "pkg" / "sub" / "m.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(cache, "ROOT", tmp_path)
    cache._file_hash.cache_clear()
    before = source_key(("pkg",))
    module.write_text("x = 2\n")
    cache._file_hash.cache_clear()
    assert source_key(("pkg",)) != before
    module.write_text("x = 1\n")
    cache._file_hash.cache_clear()
    assert source_key(("pkg",)) == before
    cache._file_hash.cache_clear()  # the real tree's hashes for the other tests
