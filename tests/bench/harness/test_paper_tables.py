"""Table 2's paired tests against independently computed values, and its rendering."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.harness.paper_tables import render, significance
from bench.harness.significance import paired_t, wilcoxon


def t4_two_sided_p(t: float) -> float:
    """Two-sided p of Student's t with 4 degrees of freedom, closed form:
    F(t) = 1/2 + (3/4)·x·(1 − x²/3), x = t/√(4 + t²)."""
    x = t / math.sqrt(4 + t * t)
    return 2 * (1 - (0.5 + 0.75 * x * (1 - x * x / 3)))


def test_paired_t_matches_the_closed_form():
    a, b = [0.31, 0.33, 0.30, 0.36, 0.35], [0.30, 0.31, 0.27, 0.32, 0.30]
    d = np.subtract(a, b)
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    t, p = paired_t(a, b)
    assert t == pytest.approx(t_hand)
    assert p == pytest.approx(t4_two_sided_p(t_hand), rel=1e-9)
    assert paired_t(b, a)[1] == pytest.approx(p)  # two-sided
    assert math.isnan(paired_t(a, a)[1])


def test_wilcoxon_exact_values():
    # all 5 differences positive: P(all signs +) + P(all -) = 2/32
    assert wilcoxon([2, 3, 4, 5, 6], [1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    # ranks 1..5, negatives {1}: W- = 1; P(W- <= 1) = 2/32 → two-sided 4/32
    assert wilcoxon([0, 2, 3, 4, 5], [1, 0, 0, 0, 0]) == pytest.approx(4 / 32)


def _rec(seed, method, ranker, vals):
    metrics = {
        t: {ranker: {"recall": vals[0] + off, "ndcg": vals[1] + off}}
        for t, off in (("click", 0.0), ("conversion", 0.01))
    }
    return {"seed": seed, "method": method, "metrics": metrics}


def test_render_bolds_the_best_and_tests_against_the_best_other_row():
    rng = np.random.default_rng(0)
    results = {
        "csmf": [_rec(s, "csmf", "fused", (0.40 + 0.001 * rng.random(), 0.24)) for s in range(5)],
        "sep": [_rec(s, "sep", "merged", (0.30 + 0.01 * s, 0.25)) for s in range(5)],
        "ease-click": [_rec(s, "ease-click", "ease", (0.39, 0.20)) for s in range(5)],
        "oracle": [
            {
                "seed": s,
                "metrics": {
                    t: {f"true {p}": {"recall": 0.9, "ndcg": 0.9}}
                    for t, p in (("click", "clicks"), ("conversion", "conversions"))
                },
            }
            for s in range(5)
        ],
    }
    lines, doc = render(results, 50)
    assert doc["best"]["click recall"] == "csmf"  # the oracle ceiling is never "best"
    assert doc["best"]["click ndcg"] == "sep"
    sig = doc["significance"]
    assert sig["click recall"]["best_other"] == "ease-click"
    assert sig["click recall"]["diff"] > 0 and sig["click recall"]["p_t"] < 1e-4
    assert sig["click ndcg"]["best_other"] == "sep" and sig["click ndcg"]["diff"] < 0
    text = "\n".join(lines)
    assert "**0.2500 ± 0.0000**" in text  # sep's nDCG, bold
    assert "CSMF worse" in text and "CSMF better" in text
    assert sig["click recall"]["seeds"] == [0, 1, 2, 3, 4]
    assert significance({"csmf": {("click", "recall"): {0: 1.0}}}) == {}


def test_table2_command_renders_from_the_quality_cache(tiny_data, tiny_config_path, tmp_path):
    """table2 and quality share one cache: a second command reuses every run."""
    import json

    from typer.testing import CliRunner

    from bench.harness.cli import app

    common = ["--data", str(tiny_data), "--config", str(tiny_config_path), "--seeds", "2"]
    common += ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    methods = ["--methods", "csmf,popularity,rp3beta-click", "--no-isolate"]
    res = CliRunner().invoke(app, ["quality", *common, *methods])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, ["table2", *common, "--methods", "csmf,popularity,rp3beta-click", "--cached-only"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / f"table2-{tiny_data.name}.json").read_text())
    # CSMF's two seeds, and seed 0 of the seed-free methods (their seed 1 is seed 0's record)
    assert doc["cache"]["hits"] == 4 and set(doc["rows"]) == {"csmf", "popularity", "rp3beta-click"}
    assert doc["seeds"]["rp3beta-click"] == [0, 1]
    assert set(doc["significance"]) == {
        "click recall", "click ndcg", "conversion recall", "conversion ndcg"
    }  # fmt: skip
    md = (tmp_path / "out" / f"table2-{tiny_data.name}.md").read_text()
    assert "**" in md and "paired t p" in md and "load average" in md
