"""`csmf tune`: the grid, the Pareto front (non-dominated, complete), validation rows only, the
CLI writing tune.json + PNG, and --apply putting the chosen point into a real running service."""

import dataclasses
import json

import httpx
import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from trainer import cli
from trainer.tune import choose, pareto_front, score_grid, weight_grid

runner = CliRunner()


def _dominated(p, q) -> bool:
    """q dominates p."""
    return bool((q >= p).all() and (q > p).any())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=40
    )  # small integers: many ties and duplicates
)
def test_front_is_non_dominated_and_dominates_the_rest(raw):
    pts = np.array(raw, dtype=float) / 20
    front = pareto_front(pts)
    on = set(front.tolist())
    for i in front:
        assert not any(_dominated(pts[i], pts[j]) for j in range(len(pts)))
    for i in set(range(len(pts))) - on:
        assert any(_dominated(pts[i], pts[j]) for j in on)
    assert list(pts[front, 0]) == sorted(pts[front, 0])
    c = choose(pts, front, 0.5)
    assert c in on


def test_choose_moves_along_the_front_with_prefer():
    pts = np.array([[0.5, 0.1], [0.4, 0.3], [0.1, 0.4], [0.2, 0.2]])
    front = pareto_front(pts)
    assert sorted(front.tolist()) == [0, 1, 2]
    assert choose(pts, front, 0.0) == 0 and choose(pts, front, 1.0) == 2
    assert choose(pts, front, 0.5) == 1


def test_grid_keeps_one_triplet_per_direction_and_no_zero():
    grid = weight_grid([0, 1, 2], 3)
    assert (0.0, 0.0, 0.0) not in grid
    assert (1.0, 1.0, 1.0) in grid and (2.0, 2.0, 2.0) not in grid
    assert (0.0, 1.0, 2.0) in grid
    directions = {tuple(np.round(np.array(w) / max(w), 9)) for w in grid}
    # the 7 triplets of 0s and 2s repeat the 0/1 ones
    assert len(directions) == len(grid) == 3**3 - 1 - 7


def test_scores_use_validation_rows_only(trained):
    """Rewriting every test-split label changes nothing; the same labels on validation rows do."""
    enc, model = trained.enc, trained.model
    grid = weight_grid([0, 1, 3], 3)
    args = (grid, ["click", "conversion"], "recall", 10)
    base, _, _ = score_grid(model, enc, *args, enc.split.val)

    def flipped(rows):
        clicked = enc.events.clicked.copy()
        clicked[rows] = ~clicked[rows]
        converted = enc.events.converted.copy()
        converted[rows] = clicked[rows]  # keep converted ⇒ clicked
        ev = dataclasses.replace(enc.events, clicked=clicked, converted=converted)
        return dataclasses.replace(enc, events=ev)

    same, _, _ = score_grid(model, flipped(enc.split.test), *args, enc.split.val)
    np.testing.assert_array_equal(base, same)
    changed, _, _ = score_grid(model, flipped(enc.split.val), *args, enc.split.val)
    assert not np.array_equal(base, changed)


def _app(fn):
    app = typer.Typer()
    app.command()(fn)
    return app


@pytest.fixture(scope="module")
def tune_run_dir(tmp_path_factory, tiny_config_path, tiny_data):
    out = tmp_path_factory.mktemp("runs") / "tune"
    res = runner.invoke(
        cli.app,
        ["train", "--config", str(tiny_config_path), "--data", str(tiny_data), "--out", str(out),
         "--set", "train.epochs=1", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_cli_writes_front_default_and_chosen(tune_run_dir, tmp_path):
    res = runner.invoke(
        _app(cli.tune),
        ["--run", str(tune_run_dir), "--values", "0,1,2", "--n", "10", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "tune.json").read_text())
    assert doc["split"] == "val" and doc["metric"] == "recall@10"
    assert (tmp_path / "tune.png").stat().st_size > 1000
    pts = np.array([[p["click"], p["conversion"]] for p in doc["points"]])
    front = {tuple(p["weights"].values()) for p in doc["front"]}
    for p in doc["front"]:
        q = np.array([p["click"], p["conversion"]])
        assert not any(_dominated(q, r) for r in pts)
    assert tuple(doc["chosen"]["weights"].values()) in front
    assert doc["default"]["weights"] == {"exposure": 1.0, "click": 1.8, "conversion": 1.2}
    assert doc["grid_size"] == len(doc["points"]) == 3**3 - 1 - 7 + 1  # + the default triplet
    assert "Pareto front" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objectives", "click,bogus"], "--objectives must be two distinct of"),
        (["--metric", "mrr"], "--metric must be recall or ndcg, got 'mrr'"),
        (["--values", "1,x"], "--values must be comma-separated numbers"),
        (["--apply", "x"], "--apply needs --url"),
    ],
)
def test_bad_options_are_one_error_line(tune_run_dir, tmp_path, args, message):
    res = runner.invoke(_app(cli.tune), ["--run", str(tune_run_dir), "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output, res.output


@pytest.mark.slow
def test_apply_puts_the_chosen_point_into_a_running_service(tune_run_dir, tmp_path, bundles, serve):
    from fixtures.services import AUTH, TOKEN

    svc = serve(bundles["flat"])
    base = ["--run", str(tune_run_dir), "--values", "0,1,2", "--n", "10", "--out", str(tmp_path)]
    bad = runner.invoke(
        _app(cli.tune), [*base, "--apply", "tuned", "--url", svc.url, "--token", "wrong"]
    )
    assert bad.exit_code == 2 and "HTTP 403" in bad.output
    res = runner.invoke(
        _app(cli.tune), [*base, "--apply", "tuned", "--url", svc.url, "--token", TOKEN]
    )
    assert res.exit_code == 0, res.output
    chosen = json.loads((tmp_path / "tune.json").read_text())["chosen"]["weights"]
    got = httpx.get(f"{svc.url}/admin/scenarios/tuned", headers=AUTH).json()
    assert got["weights"] == pytest.approx(chosen)
    r = httpx.post(f"{svc.url}/v1/retrieve", json={"user_id": "u1", "scenario": "tuned", "k": 3})
    assert r.status_code == 200 and r.json()["weights"] == pytest.approx(chosen)


def test_apply_refuses_a_bad_name_and_never_overwrites_a_concurrent_write(
    tune_run_dir, tmp_path, bundles, serve
):
    from fixtures.services import AUTH, TOKEN

    from csmf.admin_client import AdminClientError
    from trainer.tune import apply_scenario

    svc = serve(bundles["flat"])
    base = ["--run", str(tune_run_dir), "--values", "0,1,2", "--n", "10", "--out", str(tmp_path)]
    bad = runner.invoke(
        _app(cli.tune), [*base, "--apply", "x?y=1", "--url", svc.url, "--token", TOKEN]
    )
    assert bad.exit_code == 2 and "scenario name 'x?y=1' must be" in bad.output
    assert httpx.get(f"{svc.url}/admin/scenarios/x", headers=AUTH).status_code == 404
    assert not (tmp_path / "tune.json").exists()  # refused before any work
    ok = runner.invoke(
        _app(cli.tune), [*base, "--apply", "fresh", "--url", svc.url, "--token", TOKEN]
    )
    assert ok.exit_code == 0, ok.output
    doc = json.loads((tmp_path / "tune.json").read_text())
    # an admin wrote "fresh" again after the tune read version 0: the tune's write is a conflict
    with pytest.raises(AdminClientError):
        apply_scenario(doc, "fresh", svc.url, TOKEN, expected_version=0)
    assert httpx.get(f"{svc.url}/admin/scenarios/fresh", headers=AUTH).json()["version"] >= 1
