"""A corrupt or partial scenarios file (embedded store) is detected at load and on
write; the service keeps serving from memory, says so on /readyz and /metrics, and the next admin
write rewrites a good file atomically, keeping the bad one beside it. Never a 500."""

from __future__ import annotations

import json
import time

import pytest
from fixtures.services import AUTH, wait_until

from service.weight_store import FileWeightStore

OBJ = ("exposure", "click", "conversion")
TRUNCATED = '{"format":1, "generation": 3, "scen'  # a file cut mid-write
BROKEN = {
    "truncated": TRUNCATED,
    "not-json": "\x00\x01garbage",
    "no-scenarios": '{"format": 1, "generation": 3}',
    "weights-missing": '{"format": 1, "generation": 3, "scenarios": {"x": {"description": ""}}}',
    "wrong-format": '{"format": 99, "generation": 3, "scenarios": {}}',
    "a-list": "[1, 2, 3]",
}


def _aside(path):
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


@pytest.mark.parametrize("kind", list(BROKEN))
def test_corrupt_file_detected_served_from_memory_and_rewritten_by_the_next_write(tmp_path, kind):
    path = tmp_path / "s.json"
    s = FileWeightStore(path, OBJ, 0.02)
    s.start()
    try:
        assert s.wait_synced(2)
        s.put("x", {"exposure": 1.0, "click": 2.0, "conversion": 0.0}, "")
        path.write_text(BROKEN[kind])
        wait_until(lambda: not s.health.up, 1.0, "degraded")
        assert s.corrupt and str(path) in s.corrupt and "corrupt" in s.health.error
        assert s.get("x").weights["click"] == 2.0  # still served from memory
        assert _aside(path) == []  # nothing moved until a write decides to rewrite
        s.put("y", {"exposure": 0.0, "click": 1.0, "conversion": 0.0}, "after")
        doc = json.loads(path.read_text())
        assert set(doc["scenarios"]) == {"default", "x", "y"}
        (bad,) = _aside(path)
        assert bad.read_text() == BROKEN[kind]  # nothing lost: the bad bytes are kept
        assert s.corrupt is None and s.health.up
        time.sleep(0.1)
        assert s.health.up  # the sync thread reads the new file happily
    finally:
        s.stop()


def test_corrupt_file_at_startup_serves_the_default_until_a_write(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(TRUNCATED)
    s = FileWeightStore(path, OBJ, 0.02)
    s.start()
    try:
        assert not s.wait_synced(0.3)
        assert "JSONDecodeError" in s.corrupt and list(s.scenarios) == ["default"]
        s.put("x", {"exposure": 1.0}, "")
        assert set(json.loads(path.read_text())["scenarios"]) == {"default", "x"}
        assert len(_aside(path)) == 1
    finally:
        s.stop()


def test_api_reports_and_repairs_a_corrupt_file(bundles, make_client, tmp_path):
    client = make_client(bundles["flat"])
    path = tmp_path / "scenarios.json"
    put = client.put("/admin/scenarios/keep", json={"weights": [1, 2, 3]}, headers=AUTH)
    assert put.status_code == 200, put.text
    path.write_text(TRUNCATED)
    wait_until(lambda: client.get("/readyz").json()["status"] == "degraded", 2.0, "degraded")
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "corrupt" in ready.json()["weight_store"]["corrupt"]
    assert "csmf_scenarios_file_corrupt 1.0" in client.get("/metrics").text
    r = client.post("/v1/retrieve", json={"user_id": "u1", "k": 3, "scenario": "keep"})
    assert r.status_code == 200 and r.json()["weights"]["conversion"] == 3.0
    put = client.put("/admin/scenarios/new", json={"weights": [1, 0, 0]}, headers=AUTH)
    assert put.status_code == 200, put.text  # was: 500 internal error: JSONDecodeError
    assert set(json.loads(path.read_text())["scenarios"]) == {"default", "keep", "new"}
    assert _aside(path)[0].read_text() == TRUNCATED
    wait_until(lambda: client.get("/readyz").json()["status"] == "ok", 2.0, "repaired")
    assert "corrupt" not in client.get("/readyz").json()["weight_store"]
    assert "csmf_scenarios_file_corrupt 0.0" in client.get("/metrics").text
    delete = client.delete("/admin/scenarios/new", headers=AUTH)
    assert delete.status_code == 200
