"""POST /v1/feedback against a real server: per-arm counters on /metrics, clear 4xx for bad
feedback, and an event log that loses nothing on a clean shutdown and that the trainer's dataset
loader reads as a dataset's events/ folder."""

from __future__ import annotations

import shutil

import pytest
from fixtures.services import AUTH
from prometheus_client.parser import text_string_to_metric_families

from service.event_log import EventLog
from trainer.data.dataset import load_dataset

pytestmark = pytest.mark.slow
ARMS = [
    {"name": "control", "weights": [1, 1.8, 1.2], "share": 0.5},
    {"name": "conv", "weights": [0, 0, 1], "share": 0.5},
]


def _metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_feedback_counts_per_arm_logs_everything_and_trains(bundles, service_runs, serve, tmp_path):
    log_dir = tmp_path / "log"
    # rotate_s far away: every row reaches the disk only through the shutdown drain
    svc = serve(bundles["flat"], CSMF_EVENT_LOG_DIR=str(log_dir), CSMF_EVENT_LOG_ROTATE_S="3600")
    c = svc.client
    assert c.put("/admin/scenarios/exp", json={"arms": ARMS}, headers=AUTH).status_code == 200
    served, clicks, convs = {}, {}, {}
    for i in range(40):
        user = f"u{i}"
        r = c.post("/v1/retrieve", json={"user_id": user, "scenario": "exp", "k": 5}).json()
        arm = r["arm"]
        served[arm] = served.get(arm, 0) + len(r["items"])
        item = r["items"][0]["item_id"]
        fb = {"request_id": r["request_id"], "user_id": user, "item_id": item, "event": "click"}
        ok = c.post("/v1/feedback", json=fb)
        assert ok.status_code == 200 and ok.json() == {
            "recorded": "click", "scenario": "exp", "arm": arm, "duplicate": False
        }, ok.text  # fmt: skip
        for _ in range(3):  # replays: answered, neither counted nor logged
            again = c.post("/v1/feedback", json=fb)
            assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        clicks[arm] = clicks.get(arm, 0) + 1
        if i % 4 == 0:
            assert c.post("/v1/feedback", json={**fb, "event": "conversion"}).status_code == 200
            convs[arm] = convs.get(arm, 0) + 1
    assert set(served) == {"control", "conv"}

    # bad feedback: clear 4xx, nothing counted
    good = c.post("/v1/retrieve", json={"user_id": "u1", "k": 3}).json()
    base = {
        "request_id": good["request_id"],
        "user_id": "u1",
        "item_id": good["items"][0]["item_id"],
    }
    r = c.post("/v1/feedback", json={**base, "event": "purchase"})
    assert (
        r.status_code == 422
        and "event must be one of ['click', 'conversion'], got 'purchase'" in r.text
    )
    r = c.post("/v1/feedback", json={**base, "event": "click", "user_id": "u2"})
    assert r.status_code == 404 and "unknown request id" in r.text and "'u2'" in r.text
    forged = good["request_id"][:-4] + (
        "0000" if not good["request_id"].endswith("0000") else "1111"
    )
    r = c.post("/v1/feedback", json={**base, "request_id": forged, "event": "click"})
    assert r.status_code == 404 and "unknown request id" in r.text
    r = c.post("/v1/feedback", json={**base, "request_id": "nonsense", "event": "click"})
    assert r.status_code == 404
    r = c.post("/v1/feedback", json={**base, "event": "click", "extra": 1})
    assert r.status_code == 422 and "extra" in r.text
    not_served = next(f"i{j}" for j in range(1500) if f"i{j}" not in
                      {it["item_id"] for it in good["items"]})  # fmt: skip
    r = c.post("/v1/feedback", json={**base, "item_id": not_served, "event": "click"})
    assert r.status_code == 422 and f"item_id '{not_served}' is not one of the 3 items" in r.text

    text = c.get("/metrics").text
    for arm in ("control", "conv"):
        assert _metric(text, "csmf_impressions_total", scenario="exp", arm=arm) == served[arm]
        assert (
            _metric(text, "csmf_feedback_events_total", scenario="exp", arm=arm, event="click")
            == clicks[arm]
        )
        assert _metric(
            text, "csmf_feedback_events_total", scenario="exp", arm=arm, event="conversion"
        ) == convs.get(arm, 0)
    assert _metric(text, "csmf_impressions_total", scenario="default", arm="_none") == 3

    assert not list((log_dir / "events").glob("part-*.parquet"))  # nothing flushed yet
    svc.stop()  # SIGTERM: a clean shutdown drains the queue into a last part
    parts = list((log_dir / "events").glob("part-*.parquet"))
    assert parts and not list((log_dir / "events").glob("*.tmp"))

    # the log is a dataset's events/ folder: add the users and items tables and load it
    data = service_runs[0].parent / "data"
    ds_dir = tmp_path / "ds"
    shutil.copytree(log_dir / "events", ds_dir / "events")
    for t in ("users.parquet", "items.parquet"):
        shutil.copy(data / t, ds_dir / t)
    ds = load_dataset(ds_dir)
    ev = ds.events.to_pydict()
    n_clicks, n_convs = sum(clicks.values()), sum(convs.values())
    assert len(ev["user_id"]) == sum(served.values()) + 3 + n_clicks + n_convs  # lossless
    assert sum(ev["clicked"]) == n_clicks + n_convs and sum(ev["converted"]) == n_convs
    assert len(set(ev["request_id"])) == 41  # one id per retrieve (40 + the plain one)


def test_event_log_never_blocks_and_counts_what_it_drops(tmp_path):
    dropped = []
    log = EventLog(tmp_path, max_queue=2, rotate_s=3600, on_drop=dropped.append)
    # not started: nothing consumes the queue, so the third entry finds it full
    for i in range(3):
        log.served(i, "u1", ["a", "b"])
    assert dropped == [2]
    log.start()
    log.stop()
    assert len(log.parts) == 1
