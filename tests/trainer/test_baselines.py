"""Baselines and ablations train and evaluate through the trainer's code path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.harness.cli import app
from trainer import baselines
from trainer.baselines import (
    CSMF_VARIANTS,
    METHODS,
    MultiVectorModel,
    mixed_examples,
    oracle_rankers,
    run_method,
    single_objective_config,
    train_multivector,
    with_changes,
)
from trainer.cf_baselines import CF_METHODS, GRIDS
from trainer.encoding import stage_examples
from trainer.pipeline import prepare


@pytest.fixture
def enc(tiny_enc):
    return tiny_enc


@pytest.mark.parametrize("method", [m for m in METHODS if m != "oracle"])  # oracle: below
def test_each_method_trains_and_evaluates(method, tiny_cfg, enc, paper_baselines, monkeypatch):
    cfg = tiny_cfg
    if method in paper_baselines.TRAIN:
        # the paper's baselines train once per session (conftest.py), shared with
        # test_paper_baselines.py: run_method's call of train_<method>(cfg, enc) returns it
        cfg = paper_baselines.cfg

        def trained(c, e):
            assert c is cfg and e is enc, "run_method trains on the config and data it was given"
            return paper_baselines(method)

        monkeypatch.setattr(baselines, f"train_{method}", trained)
    run = run_method(method, cfg, enc, log=lambda _: None)
    assert set(run.result["metrics"]) == {"click", "conversion"}
    for target, rankers in run.result["metrics"].items():
        assert rankers, target
        for name, m in rankers.items():
            assert 0.0 <= m["recall"] <= 1.0 and 0.0 <= m["ndcg"] <= 1.0, (target, name)
    # MVKE: 3 tasks x 2 kernels x out_dim; DMMP, DTML, MOPPR: one out_dim vector per item
    dims = {"sep": 2 * 16, "mmoe": 3 * 16, "mvke": 6 * 16, "popularity": 0, "bpr-click": 17}
    dims = dims.get(method, 16)
    if method.startswith(("ease", "itemknn", "rp3beta")):  # user row x item-item matrix
        dims = enc.n_items
    assert sum(v.shape[1] for _, v, _ in run.serving) == dims
    for q, v, _ in run.serving:
        assert q.shape == (enc.n_users, v.shape[1]) and v.shape[0] == enc.n_items
    if method in CF_METHODS:  # run_cf's record of its validation choice (tuning.json)
        model, signal = CF_METHODS[method]
        assert run.tuning["model"] == model and run.tuning["signal"] == signal
        assert set(run.tuning["params"]) == set(GRIDS[model])
        assert len(run.tuning["grid"]) == int(np.prod([len(v) for v in GRIDS[model].values()]))
        assert run.tuning["deterministic"] == (model in ("ease", "itemknn", "rp3beta"))


def test_variants_are_config_switches(tiny_cfg):
    wo = {m: with_changes(tiny_cfg, c) for m, c in CSMF_VARIANTS.items()}
    assert wo["csmf-wo-cpp"].cascade.pruning == "fixed"
    assert wo["csmf-wo-aml"].loss.aml is False
    assert wo["csmf-wo-ar"].cascade.accuracy_recovery is False
    assert wo["csmf"] == tiny_cfg


def test_single_objective_config_keeps_stage_budget(tiny_cfg):
    c = single_objective_config(tiny_cfg, "conversion")
    assert c.objectives == ("conversion",)
    assert c.train.stage_epochs(0) == tiny_cfg.train.stage_epochs(2)
    assert c.train.stage_lr(0) == tiny_cfg.train.stage_lr(2)
    assert c.loss == tiny_cfg.loss and c.features == tiny_cfg.features


def test_single_objective_config_takes_its_stage_history(tiny_cfg):
    """Per-stage train.history / history_dropout (the ML-100K default) are sliced like lr and
    epochs: the single-objective baselines (exposure-only, Sep, Mix) failed config validation
    with a 3-value list on a 1-stage cascade."""
    cfg = with_changes(
        tiny_cfg,
        {"train": {"history": ["before", "before", "others"], "history_dropout": [0, 0, 0.5]}},
    )
    for t, objective in enumerate(cfg.objectives):
        c = single_objective_config(cfg, objective)
        assert c.train.stage_history(0) == cfg.train.stage_history(t)
    assert single_objective_config(cfg, "conversion").train.history == ("others",)


def test_mixed_examples_are_click_plus_conversion_positives(enc):
    mix = mixed_examples(enc, ("click", "conversion"))
    n_click = len(stage_examples(enc, "click"))
    n_conv = len(stage_examples(enc, "conversion"))
    assert len(mix) == n_click + n_conv
    assert torch.isclose(mix.item_prob.sum(), torch.tensor(1.0))


def test_multivector_fused_score_is_weighted_sum_of_objective_scores(tiny_cfg, enc):
    cfg = with_changes(tiny_cfg, {"train": {"epochs": [1]}})
    model, losses = train_multivector(cfg, enc)
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert isinstance(model, MultiVectorModel)
    model.eval()
    with torch.no_grad():
        users = np.arange(min(8, enc.n_users))
        e = model.user(enc.user_batch(users))  # (B, 3D)
        v = model.item(enc.item_batch(np.arange(enc.n_items)))  # (N, 3D)
        k = [1.0, 1.8, 1.2]
        fused = (e * model.fused_scale(k)) @ v.T
        per = [model.user(enc.user_batch(users), t) @ model.item(
            enc.item_batch(np.arange(enc.n_items)), t
        ).T for t in range(3)]  # fmt: skip
        expected = sum(kt * s for kt, s in zip(k, per, strict=True))
        assert torch.allclose(fused, expected, atol=1e-5)
        for t in range(3):
            assert torch.allclose((e * model.view_scale(t)) @ v.T, per[t], atol=1e-5)
        pairs = model.objective_scores(e, v[: len(users)])
        assert torch.allclose(pairs[:, 1], (per[1]).diagonal(), atol=1e-5)


def test_bench_quality_writes_md_and_json(tiny_config_path, tiny_data, tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    args = ["quality", "--data", str(tiny_data), "--config", str(tiny_config_path)]
    args += ["--seeds", "1", "--out", str(out), "--cache", str(cache)]
    args += ["--methods", "csmf,sep,mmoe,popularity", "--no-isolate"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    name = tiny_data.resolve().name
    md = (out / f"quality-{name}.md").read_text()
    data = json.loads((out / f"quality-{name}.json").read_text())
    assert "| csmf | fused |" in md and "| sep | merged |" in md and "µs/query" in md
    assert data["seeds"]["csmf"] == [0]
    assert data["serving"]["sep"]["indexes"] == 2
    assert data["serving"]["mmoe"]["dims_per_item"] == 48
    assert data["serving"]["csmf"]["bytes_per_item"] == 64
    assert set(data["metrics"]) == {"csmf", "sep", "mmoe", "popularity"}
    # a second invocation resumes from the per-run cache (no retraining, same numbers)
    res2 = CliRunner().invoke(app, args)
    assert res2.exit_code == 0, res2.output
    again = json.loads((out / f"quality-{name}.json").read_text())
    assert again["metrics"] == data["metrics"]
    assert data["serving"]["sep"]["vectors"] == "trained"
    assert again["serving"]["sep"]["vectors"] == "random"  # cached: same-shape stand-ins
    assert again["serving"]["sep"]["index_bytes"] == data["serving"]["sep"]["index_bytes"]


def test_bench_rejects_unknown_method(tiny_data, tmp_path):
    res = CliRunner().invoke(
        app, ["quality", "--data", str(tiny_data), "--methods", "nope", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2


def test_oracle_ranks_by_the_generators_true_scores(tmp_path):
    from csmf.errors import DataError
    from trainer.config import load_config
    from trainer.data.synthetic import SyntheticConfig, generate_synthetic, load_truth, true_scores

    data = tmp_path / "synth"
    generate_synthetic(SyntheticConfig(users=300, items=1_000, exposures=40_000, seed=7), data)
    cfg = load_config(Path(__file__).parents[2] / "configs" / "synthetic.toml")
    enc = prepare(cfg, data)
    rankers = oracle_rankers(enc, data)
    truth = load_truth(data)
    users = np.array([3, 0, 7])
    got = rankers["true clicks"][1](users)  # (3, N) in the encoded item order
    uid = [int(enc.user_vocab.ids.values[u]) for u in users]
    iid = [int(i) for i in enc.item_vocab.ids.values]
    np.testing.assert_array_equal(got, true_scores(truth, np.array(uid), "click")[:, iid])
    oracle = run_method("oracle", cfg, enc, data=data).result["metrics"]
    pop = run_method("popularity", cfg, enc).result["metrics"]
    for target, ranker in (("click", "true clicks"), ("conversion", "true conversions")):
        assert oracle[target][ranker]["recall"] > pop[target]["clicks"]["recall"]
    with pytest.raises(DataError, match="truth.npz"):
        oracle_rankers(enc, tmp_path)


@pytest.mark.parametrize("method", ["csmf", "sep", "mix", "mmoe"])
def test_two_tower_methods_train_with_the_catalogue_softmax(method, tiny_cfg, enc):
    cfg = with_changes(tiny_cfg, {"loss": {"negatives": "catalogue"}, "model": {"hidden": []}})
    run = run_method(method, cfg, enc, log=lambda _: None)
    for rankers in run.result["metrics"].values():
        for m in rankers.values():
            assert 0.0 <= m["recall"] <= 1.0 and np.isfinite(m["ndcg"])
