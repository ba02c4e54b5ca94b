"""`csmf daily` end to end, the real CLI against a real `csmf serve` (uvicorn on loopback):

- day 1 trains from scratch and publishes bundles/current, which the service is started on;
- on day 2's events (new events, users and items), a deliberately worse candidate (a warm start
  at a learning rate that wrecks it) is refused by the gate: exit 3, the pointer and the served
  model unchanged, the candidate kept for inspection;
- then the real warm start passes the gate, publishes, and reloads the live replica while a
  client keeps retrieving: every request answers 200, the old model until the reload, the new one
  after, never back; a second replica that does not answer makes the exit status 4 without
  rolling the live one back;
- the same events once more: nothing new to learn, exit 0, nothing trained;
- status.json and STATE/daily.prom report each attempt.
"""

from __future__ import annotations

import json
import threading

import pytest
from fixtures.services import AUTH, TOKEN, free_port, wait_until

from csmf.bundle import read_manifest
from daily.state import State

from .conftest import run_daily_cli

pytestmark = pytest.mark.slow


class Poller:
    """Retrieves for one user in a loop; records (status, model_version) of every answer."""

    def __init__(self, client) -> None:
        self.client, self.seen, self.stop = client, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            r = self.client.post("/v1/retrieve", json={"user_id": "u1", "k": 5})
            self.seen.append((r.status_code, r.json().get("model_version")))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def test_days_publish_refuse_reload_and_nothing_new(days, serve, tmp_path):
    state = tmp_path / "state"
    first = run_daily_cli(state, days["day1"], "--config", str(days["config"]))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "daily: published" in first.stdout and "train from scratch" in first.stderr
    assert (
        "no serving model yet"
        in json.loads((state / "status.json").read_text())["last_success"]["gate"]["reason"]
    )
    st = State(state)
    gen1 = st.current()
    assert gen1 and (st.run_of(gen1) / "checkpoint.pt").exists()
    v1 = read_manifest(st.bundle_of(gen1)).model_version

    svc = serve(state / "bundles" / "current")
    assert svc.client.get("/admin/bundle", headers=AUTH).json()["model_version"] == v1

    # a deliberately worse candidate (the warm start at a learning rate that wrecks it)
    worse = run_daily_cli(state, days["day2"], "--set", "warm.lr=30", "--margin", "0.01",
                          "--replicas", svc.url, env={"CSMF_ADMIN_TOKEN": TOKEN})  # fmt: skip
    assert worse.returncode == 3, worse.stderr[-3000:]
    assert "warm start from" in worse.stderr
    assert "error: not published: candidate is worse than the serving model" in worse.stderr
    assert st.current() == gen1
    assert svc.client.get("/admin/bundle", headers=AUTH).json()["model_version"] == v1
    refused = list((state / "refused").iterdir())
    assert len(refused) == 1 and (refused[0] / "checkpoint.pt").exists()
    assert json.loads((refused[0] / "gate.json").read_text())["passed"] is False
    assert not list(state.glob("partial-*"))
    status = json.loads((state / "status.json").read_text())
    assert status["last_attempt"]["outcome"] == "refused"
    assert status["last_attempt"]["exit_code"] == 3
    prom = (state / "daily.prom").read_text()
    assert 'csmf_daily_last_run_outcome{outcome="refused"} 1.0' in prom
    assert 'csmf_daily_quality{metric="recall",model="serving",target="click"}' in prom

    # the real update, while a client keeps retrieving; one replica is dead
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Poller(svc.client) as poller:
        wait_until(lambda: len(poller.seen) >= 3, 30, "the client's first answers")
        second = run_daily_cli(
            state, days["day2"], "--replicas", f"{svc.url},{dead}", "--margin", "0.5",
            env={"CSMF_ADMIN_TOKEN": TOKEN},
        )  # fmt: skip
        gen2 = st.current()
        v2 = read_manifest(st.bundle_of(gen2)).model_version
        wait_until(lambda: poller.seen[-1][1] == v2, 30, "an answer from the new model")
    assert second.returncode == 4, second.stderr[-3000:]
    assert "warm start from" in second.stderr
    assert f"{dead}" in second.stderr and "did not reload" in second.stderr
    assert "not rolled back" in second.stderr
    assert gen2 != gen1 and v2 != v1
    assert f"replica {svc.url}: reloaded {v2}" in second.stderr
    assert "gate (recall@10" in second.stderr and "serving" in second.stderr
    statuses = {s for s, _ in poller.seen}
    assert statuses == {200}, statuses
    versions = [v for _, v in poller.seen]
    switch = versions.index(v2)
    assert set(versions[:switch]) == {v1} and set(versions[switch:]) == {v2}, "went back"
    assert switch > 0, "the old bundle served until the reload"
    status = json.loads((state / "status.json").read_text())
    assert status["last_attempt"]["outcome"] == "reload_failed"
    assert status["last_success"]["gen"] == gen1  # a partial reload is not a success
    assert [r["ok"] for r in status["last_attempt"]["replicas"]] == [True, False]

    # the same events again: nothing new to learn, nothing trained, the model stays
    again = run_daily_cli(state, days["day2"], "--replicas", svc.url,
                          env={"CSMF_ADMIN_TOKEN": TOKEN})  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "daily: nothing new" in again.stdout and "the serving model stays" in again.stdout
    assert st.current() == gen2 and not list(state.glob("partial-*"))
    status = json.loads((state / "status.json").read_text())
    assert status["last_attempt"]["outcome"] == "unchanged"
    assert status["last_attempt"]["steps"] == {}
