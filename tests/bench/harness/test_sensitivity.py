"""`csmf bench sensitivity`: sweeps and weight grids on the validation split, and their plots."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bench.harness.cli import app
from bench.harness.sensitivity import weight_grid


def _run(args):
    res = CliRunner().invoke(app, ["sensitivity", *args])
    return res


def test_weight_grid_varies_one_coefficient_at_a_time():
    grid = weight_grid([1.0, 1.8, 1.2], [0.0, 1.0, 1.8])
    assert (1.0, 1.8, 1.2) in grid and len(set(grid)) == len(grid)
    for w in grid:
        assert sum(a != b for a, b in zip(w, (1.0, 1.8, 1.2), strict=True)) <= 1
    assert (0.0, 1.8, 1.2) in grid and (1.0, 0.0, 1.2) in grid and (1.0, 1.8, 0.0) in grid
    assert weight_grid([1.0, 0.0], [0.0]) == [(1.0, 0.0)]  # <0,0> ranks nothing: skipped


def test_sweep_records_validation_metrics_and_slices(tiny_config_path, tiny_data, tmp_path):
    base = ["--data", str(tiny_data), "--config", str(tiny_config_path), "--out", str(tmp_path)]
    res = _run(["sweep", *base, "--key", "cascade.tau", "--values", "0.5", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    res = _run(["sweep", *base, "--key", "cascade.tau", "--values", "0.5", "--seeds", "1"]
               + ["--set", "cascade.pruning=fixed"])  # fmt: skip
    assert res.exit_code == 0, res.output
    name = tiny_data.resolve().name
    doc = json.loads((tmp_path / f"sensitivity-{name}.json").read_text())
    assert doc["split"] == "val"
    settings = [p["setting"] for p in doc["points"]]
    assert settings == ["cascade.tau=0.5", "cascade.pruning=fixed cascade.tau=0.5"]
    cpp, fixed = (p["runs"][0] for p in doc["points"])
    for run in (cpp, fixed):
        assert sum(run["output_slices"]) == 16  # tiny model.out_dim
        for target in ("click", "conversion"):
            for ranker in ("exposure", "click", "conversion", "fused"):
                assert 0.0 <= run["metrics"][target][ranker]["recall"] <= 1.0
        assert run["stages"][0]["slices"]["output"]["freed"] > 0
    assert fixed["stages"][0]["slices"]["output"] == {"kept": 8, "freed": 8}  # round(0.5 * 16)
    md = (tmp_path / f"sensitivity-{name}.md").read_text()
    assert "| cascade.pruning=fixed cascade.tau=0.5 | 0 |" in md
    # rerunning a setting replaces its point instead of appending a twin (--seeds 1 = seed 0)
    res = _run(["sweep", *base, "--key", "cascade.tau", "--values", "0.5", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / f"sensitivity-{name}.json").read_text())
    assert [p["setting"] for p in doc["points"]].count("cascade.tau=0.5") == 1
    assert doc["points"][-1]["setting"] == "cascade.tau=0.5"
    assert [r["seed"] for r in doc["points"][-1]["runs"]] == [0]

    res = _run(["plot", "--data", str(tiny_data), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    png = tmp_path / f"sensitivity-{name}-tau.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_sweep_scores_every_triplet_on_one_model(tiny_config_path, tiny_data, tmp_path):
    args = ["weights", "--data", str(tiny_data), "--config", str(tiny_config_path)]
    args += ["--out", str(tmp_path), "--values", "0,1,2", "--seeds", "1"]
    args += ["--set", "eval.weights=[1.0, 1.0, 0.0]"]
    res = _run(args)
    assert res.exit_code == 0, res.output
    name = tiny_data.resolve().name
    doc = json.loads((tmp_path / f"weights-{name}.json").read_text())
    grid = [tuple(w) for w in doc["grid"]]
    assert grid == weight_grid([1.0, 1.0, 0.0], [0.0, 1.0, 2.0])
    run = doc["runs"][0]
    for target in ("click", "conversion"):
        # the base triplet is the config's fused ranker: same model, same numbers
        assert run["metrics"][target]["<1,1,0>"] == run["metrics"][target]["fused"]
        # <1,0,0> ranks by the exposure view alone (scale 1 on every dim the view owns)
        assert run["metrics"][target]["<1,0,0>"] == run["metrics"][target]["exposure"]
        # <0,1,0> ranks by the click score s_1 alone, which is the click view
        assert run["metrics"][target]["<0,1,0>"] == run["metrics"][target]["click"]
    assert "## k_click" in (tmp_path / f"weights-{name}.md").read_text()
    res = _run(["plot", "--data", str(tiny_data), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"weights-{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_a_clear_error(tiny_config_path, tiny_data, tmp_path):
    base = ["--data", str(tiny_data), "--config", str(tiny_config_path), "--out", str(tmp_path)]
    res = _run(["sweep", *base, "--key", "cascade.tau", "--values", "1.5"])
    assert res.exit_code == 2 and "cascade.tau" in res.output
    res = _run(["weights", *base, "--values", "a,b"])
    assert res.exit_code != 0 and "--values" in res.output
    for seeds in ("0,1", "0"):  # a count, as in every command: not a list, at least 1
        res = _run(["weights", *base, "--seeds", seeds])
        assert res.exit_code == 2 and "--seeds" in res.output
    res = _run(["plot", "--data", str(tiny_data), "--out", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "run sweep or weights first" in res.output
