"""The objective registry (csmf/objectives.py) is the one place that names the funnel: a cascade
over a subset of it trains and evaluates end to end, and the training / data / evaluation /
benchmark modules name no objective or label column themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import csmf.objectives as funnel
from csmf.checkpoint import load_checkpoint
from csmf.errors import ConfigError
from trainer.config import load_config
from trainer.pipeline import eval_run, train_run

ROOT = Path(__file__).resolve().parents[2]
NAMED = {*funnel.NAMES, *funnel.LABEL_COLUMNS}
# Modules allowed to name the funnel: the registry; data writers, which define the labels they
# write (MovieLens ratings → clicked/converted, the synthetic generator's ground truth); the
# baselines, whose methods are defined by objective ("exposure-only", "als-click").
ALLOWED = {
    "csmf/objectives.py",
    "csmf/features.py",  # history.source: which objective's positives form the history
    "trainer/data/movielens.py",
    "trainer/data/synthetic.py",
    "trainer/cf_baselines.py",
}
ALLOWED_PACKAGES = ("trainer/baselines/",)  # one module per baseline method


def test_registry_is_a_funnel():
    assert funnel.NAMES == ("exposure", "click", "conversion")
    for i, o in enumerate(funnel.FUNNEL):
        assert (o.parent is None) == (i == 0)
        assert o.parent is None or funnel.NAMES.index(o.parent) < i
    assert funnel.TARGETS == ("click", "conversion")
    assert funnel.check_cascade(["exposure", "conversion"]) == ("exposure", "conversion")
    with pytest.raises(ConfigError, match="funnel order"):
        funnel.check_cascade(["conversion", "click"])
    with pytest.raises(ConfigError, match="distinct names"):
        funnel.check_cascade(["click", "purchase"])
    with pytest.raises(ConfigError, match="unknown objective 'purchase'"):
        funnel.get("purchase")


def test_nothing_else_names_the_objectives():
    found = []
    for pkg in ("csmf", "trainer", "index_builder"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED or rel.startswith(ALLOWED_PACKAGES):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in NAMED:
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert found == []


@pytest.mark.parametrize("objectives", [("exposure", "conversion"), ("click", "conversion")])
def test_two_objective_cascades_train_and_evaluate(
    objectives, tiny_config_path, tiny_data, tmp_path
):
    cfg = load_config(
        tiny_config_path,
        [f"cascade.objectives={list(objectives)}", "eval.weights=[1, 1]", "train.epochs=1",
         "train.ar_epochs=1"],
    )  # fmt: skip
    path, metrics = train_run(cfg, tiny_data, tmp_path / "run", log=lambda _: None, progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt.objectives == objectives and ckpt.model_config.num_objectives == 2
    assert [s["objective"] for s in metrics["stages"]] == list(objectives)
    result = eval_run(tmp_path / "run")
    assert list(result["metrics"]) == list(funnel.TARGETS)  # every labelled objective
    for ranker in (*objectives, "fused"):
        assert 0.0 <= result["metrics"]["conversion"][ranker]["recall"] <= 1.0
