"""Feedback exactly once per (request id, item, event) and only for items the request returned:
replays are 200 ``"duplicate": true`` and not counted — within one process without
Redis, across replicas (two apps) sharing a Redis — feedback for another item is a 422, and a
history-only request (no user) can receive feedback too."""

from __future__ import annotations

import time

from fixtures.services import REDIS_URL
from prometheus_client.parser import text_string_to_metric_families

from service.feedback_once import FeedbackOnce


def _clicks(client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "csmf_feedback_events_total" and s.labels.get("event") == "click":
                return s.value
    return 0.0


def _serve_and_click(clients, body):
    doc = clients[0].post("/v1/retrieve", json=body).json()
    fb = {"request_id": doc["request_id"], "item_id": doc["items"][1]["item_id"], "event": "click"}
    if "user_id" in body:
        fb["user_id"] = body["user_id"]
    answers = [clients[n % len(clients)].post("/v1/feedback", json=fb) for n in range(10)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    return doc, fb, [a.json()["duplicate"] for a in answers]


def test_in_process_replays_count_once_and_only_returned_items(bundles, make_client):
    c = make_client(bundles["flat"])
    doc, fb, dup = _serve_and_click([c], {"user_id": "u3", "k": 4})
    assert dup == [False] + [True] * 9 and _clicks(c) == 1
    # the same item's conversion is another event: recorded once too
    conv = [c.post("/v1/feedback", json={**fb, "event": "conversion"}).json() for _ in range(2)]
    assert [a["duplicate"] for a in conv] == [False, True]
    served = {it["item_id"] for it in doc["items"]}
    other = next(f"i{j}" for j in range(1500) if f"i{j}" not in served)
    r = c.post("/v1/feedback", json={**fb, "item_id": other})
    assert r.status_code == 422 and "is not one of the 4 items" in r.text
    assert r.json()["detail"][0]["loc"] == ["body", "item_id"]
    # a history-only request: feedback without a user id; a user id does not fit its signature
    _, fb2, dup = _serve_and_click([c], {"history": ["i1", "i2"], "k": 3})
    assert dup == [False] + [True] * 9 and _clicks(c) == 2
    r = c.post("/v1/feedback", json={**fb2, "user_id": ""})
    assert r.status_code in (404, 422)


def test_redis_makes_replays_count_once_across_replicas(bundles, make_client, redis_prefix):
    kw = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix, "feedback_key": "shared-key"}
    a, b = make_client(bundles["flat"], **kw), make_client(bundles["flat"], **kw)
    _, _, dup = _serve_and_click([a, b], {"user_id": "u5", "k": 3})  # alternating replicas
    assert dup == [False] + [True] * 9
    assert _clicks(a) + _clicks(b) == 1


def test_in_process_marks_expire_and_stay_bounded():
    once = FeedbackOnce(None, "p:", 0.1, max_local=3)
    assert once.first(1, "a", "click", 0.05) and not once.first(1, "a", "click", 0.05)
    time.sleep(0.06)
    assert once.first(1, "a", "click", 60)  # the id's lifetime ended: a new mark
    for i in range(10):
        assert once.first(2, f"x{i}", "click", 60)
    assert len(once._local) == 3  # the oldest forgotten first
