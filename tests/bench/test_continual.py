"""bench/continual.py's user subsets: who a test user is, and the half that chooses settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.continual import GROUPS, HALVES, render, user_half, user_subsets
from trainer.config import load_config
from trainer.pipeline import eval_run, train_run


def test_a_user_is_always_in_the_same_half_and_both_halves_are_used():
    ids = [str(u) for u in range(1, 2001)]
    halves = [user_half(u) for u in ids]
    assert halves == [user_half(u) for u in ids]  # by the id alone
    share = halves.count("val") / len(halves)
    assert set(halves) == set(HALVES) and 0.45 < share < 0.55


@pytest.fixture(scope="module")
def run(tiny_config_path, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("continual") / "run"
    cfg = load_config(tiny_config_path, ["train.epochs=1", "train.ar_epochs=1"])
    train_run(cfg, tiny_data, out, log=lambda _: None, progress=False)
    return out


def test_subsets_partition_the_test_users(run, tiny_data):
    """Groups and halves each split the run's evaluated users exactly; a subset's metrics are
    those of its own users (the halves' user-weighted mean is the all-users figure)."""
    import pyarrow.parquet as pq

    ts = np.sort(pq.read_table(tiny_data / "events.parquet")["timestamp"].to_numpy())
    sub = user_subsets(run, int(ts[len(ts) // 2]))
    whole = eval_run(run, write=False)
    for target in ("click", "conversion"):
        n = whole["users"][target]
        assert sum(sub["groups"][g]["users"][target] for g in GROUPS) == n
        assert sum(sub["halves"][h]["users"][target] for h in HALVES) == n
        for m in ("recall", "ndcg"):
            mixed = sum(
                sub["halves"][h][target][m] * sub["halves"][h]["users"][target] for h in HALVES
            )
            assert mixed / n == pytest.approx(whole["metrics"][target]["fused"][m])


def _result(val: float, test: float) -> dict:
    """A run's bench result whose val half scores ``val`` and test half ``test`` everywhere."""
    metrics = lambda x: {t: {"recall": x, "ndcg": x} for t in ("click", "conversion")}  # noqa: E731
    return {
        "seconds": 10.0, "train_seconds": 8.0, "metrics": metrics((val + test) / 2),
        "halves": {"val": metrics(val), "test": metrics(test)},
    }  # fmt: skip


@pytest.mark.parametrize(("report", "shown"), [("val", "+10.0%"), ("test", "-10.0%")])
def test_report_renders_the_chosen_half(tmp_path, report, shown):
    rows = [
        {"seed": s, "period": 6, "full": _result(0.2, 0.2),
         "variants": {"warm": _result(0.22, 0.18)}}
        for s in range(3)
    ]  # fmt: skip
    doc = {
        "run": {"date": "2026-12-06 00:00 UTC", "commit": "abc1234", "cores": 2,
                "load_before": 0.5, "load_after": 0.5},
        "code_key": "k", "seeds": [0, 1, 2], "first": 5, "until": 7, "sets": [],
        "variants": {"warm": []}, "report": report, "datasets": {}, "rows": rows,
    }  # fmt: skip
    out = tmp_path / "continual"
    render(doc, "python bench/continual.py", out)
    text = out.with_suffix(".md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| warm | 3 |"))
    assert row.split("|")[3].strip() == shown
    assert f"Quality on the {report} half" in text
    assert json.loads(out.with_suffix(".json").read_text())["report"] == report
