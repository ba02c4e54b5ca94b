"""``csmf daily --from-scratch``: a scheduled full retrain (e.g. weekly) instead of a warm start of
the serving run, so a chain of warm starts stays short; the gate still compares the candidate
with the serving model (bench/results/continual-ml-100k.md)."""

from __future__ import annotations

import json

from daily.gate import GateConfig
from daily.state import State
from daily.update import OK, REFUSED, DailyOptions, run_daily

from .conftest import PERIOD_S


def _candidate_metrics(state, outcome) -> dict:
    st = State(state)
    run = st.run_of(st.current()) if outcome.code == OK else state / "refused" / outcome.gen
    return json.loads((run / "train_metrics.json").read_text())


def test_from_scratch_retrains_the_cascade_and_the_gate_still_compares(days, state):
    lines: list[str] = []
    opts = DailyOptions(
        state=state, data=days["day2"], gate=GateConfig(n=10), period_s=PERIOD_S,
        from_scratch=True,
    )  # fmt: skip
    outcome = run_daily(opts, log=lines.append)
    assert outcome.code in (OK, REFUSED), outcome.message
    assert any("train from scratch" in m and "--from-scratch" in m for m in lines), lines
    assert not any(m.startswith("warm start from") for m in lines)
    metrics = _candidate_metrics(state, outcome)
    assert "warm_start" not in metrics  # a cascade: every stage trained, pruned and recovered
    assert [s["objective"] for s in metrics["stages"]] == ["exposure", "click", "conversion"]
    assert all("trained" in s["val_recall"] for s in metrics["stages"])
    assert outcome.gate is not None and outcome.gate.serving is not None  # compared with it


def test_without_it_a_later_day_warm_starts(days, state):
    lines: list[str] = []
    opts = DailyOptions(state=state, data=days["day2"], gate=GateConfig(n=10), period_s=PERIOD_S)
    outcome = run_daily(opts, log=lines.append)
    assert outcome.code in (OK, REFUSED), outcome.message
    assert any(m.startswith("warm start from") for m in lines), lines
    assert "warm_start" in _candidate_metrics(state, outcome)
