"""daily/state.py and daily/metrics.py without training: the commit is one symlink rename,
recovery removes only what was never committed, pruning never removes a protected generation,
and the metrics of a failed attempt keep the last success."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daily.metrics import registry_for
from daily.state import State, StateError


def fake_gen(st: State, gen: str) -> None:
    for folder in (st.data_of(gen), st.run_of(gen), st.bundle_of(gen)):
        folder.mkdir(parents=True)
    (st.bundle_of(gen) / "manifest.json").write_text("{}")


def test_commit_swaps_the_pointer_and_recovery_spares_the_committed(tmp_path):
    st = State(tmp_path)
    st.lock()
    assert st.current() is None
    fake_gen(st, "g1")
    st.commit("g1")
    assert st.current() == "g1" and os.readlink(st.bundles / "current") == "g1"

    # g2 moved its folders into place but died before the commit; g3 died after it
    st.start("g2")
    st.mark("g2", "publish")
    fake_gen(st, "g2")
    got = st.recover()
    assert [(r.gen, r.step, r.committed) for r in got] == [("g2", "publish", False)]
    assert got[0].removed == ("partial-g2", "data/g2", "runs/g2", "bundles/g2")
    assert st.current() == "g1" and st.bundle_of("g1").exists()

    st.start("g3")
    st.mark("g3", "reload")
    fake_gen(st, "g3")
    st.commit("g3")
    [r] = st.recover()
    assert r.committed and r.removed == ("partial-g3",) and "after publishing" in r.message()
    assert st.current() == "g3" and st.bundle_of("g3").exists()
    st.unlock()


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    st = State(tmp_path)
    st.lock()
    for g in ("g1", "g2", "g3", "g4", "g5"):
        fake_gen(st, g)
    st.commit("g5")
    assert st.prune(2, protect={"g5", "g1"}) == ["g2", "g3"]
    assert sorted(p.name for p in st.runs.iterdir()) == ["g1", "g4", "g5"]
    assert sorted(p.name for p in st.data.iterdir()) == ["g1", "g4", "g5"]
    st.unlock()


def test_a_pointer_that_is_not_a_symlink_is_refused(tmp_path):
    st = State(tmp_path)
    st.lock()
    (st.bundles / "current").mkdir()
    with pytest.raises(StateError, match="must be a symlink"):
        st.current()
    st.unlock()


def gauges(reg) -> dict[tuple, float]:
    from prometheus_client import generate_latest

    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_failed_attempt_keeps_the_last_success_in_the_metrics():
    gate = {"candidate": {"click": {"recall": 0.5, "ndcg": 0.3}},
            "serving": {"click": {"recall": 0.6, "ndcg": 0.35}}}  # fmt: skip
    success = {"finished_at": 1000.0, "outcome": "published", "steps": {"train": 5.0},
               "gate": {**gate, "serving": None}, "replicas": [{"ok": True}]}  # fmt: skip
    failed = {"finished_at": 2000.0, "outcome": "refused", "steps": {"train": 4.0},
              "gate": gate, "replicas": []}  # fmt: skip
    g = gauges(registry_for({"last_attempt": failed, "last_success": success}, 3600))
    assert g[("csmf_daily_last_success_timestamp_seconds", ())] == 1000.0
    assert g[("csmf_daily_last_run_timestamp_seconds", ())] == 2000.0
    assert g[("csmf_daily_max_model_age_seconds", ())] == 3600
    assert g[("csmf_daily_last_run_outcome", (("outcome", "refused"),))] == 1
    assert g[("csmf_daily_last_run_outcome", (("outcome", "published"),))] == 0
    key = (("metric", "recall"), ("model", "serving"), ("target", "click"))
    assert g[("csmf_daily_quality", key)] == 0.6
    published = (("metric", "recall"), ("target", "click"))
    assert g[("csmf_daily_published_quality", published)] == 0.5
    never = gauges(registry_for({"last_attempt": failed, "last_success": None}, 3600))
    assert ("csmf_daily_last_success_timestamp_seconds", ()) not in never
