"""The event log is always a valid training input: a real server logs requests of every
kind — known users, unknown users (cold start), history-only requests, unknown users with a
history, batches mixing them, an experiment's arms, explicit weights, clicks and conversions — and
`csmf train` (the real CLI, a few steps) trains from the log plus the dataset's users and items.
The loader skips and counts the rows that cannot train instead of refusing the log."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from fixtures.services import AUTH, ROOT

from trainer.data.dataset import load_dataset

pytestmark = pytest.mark.slow
CONFIG = """
[features.user]
id_dim = 8
fields = [
  { name = "gender", kind = "categorical", dim = 4 },
  { name = "age", kind = "numeric" },
  { name = "tags", kind = "multi_hot", dim = 4, max_len = 3 },
]
history = { max_len = 6, dim = 8 }
[features.item]
id_dim = 8
fields = [
  { name = "genre", kind = "categorical", dim = 4 },
  { name = "genres", kind = "multi_hot", dim = 4, max_len = 3 },
  { name = "price", kind = "numeric" },
]
[model]
out_dim = 12
hidden = [16]
[train]
batch_size = 32
epochs = [1, 1, 1]
ar_epochs = 0
max_steps = 3
threads = 1
data = "memory"
[split]
val_frac = 0.1
test_frac = 0.2
"""
ARMS = [
    {"name": "a", "weights": [1, 1, 1], "share": 0.5},
    {"name": "b", "weights": [0, 1, 2], "share": 0.5},
]


def test_a_log_of_every_kind_of_request_trains(bundles, service_runs, serve, tmp_path):
    log_dir = tmp_path / "log"
    svc = serve(bundles["flat"], CSMF_EVENT_LOG_DIR=str(log_dir))
    c = svc.client
    assert c.put("/admin/scenarios/exp", json={"arms": ARMS}, headers=AUTH).status_code == 200
    bodies = []
    for i in range(50):
        bodies.append({"user_id": f"u{i % 60}", "k": 5, "scenario": "exp"})
        bodies.append({"user_id": f"u{i % 60}", "k": 5, "weights": [1, 2, 3]})
    bodies += [
        {"user_id": "nobody-1", "k": 5},  # unknown user: cold start
        {"history": ["i1", "i2", "i3"], "k": 5},  # history only
        {"user_id": "nobody-2", "history": ["i4", "i5"], "k": 5},  # unknown user with a history
        {"user_id": "u1", "history": ["i9"], "k": 5},  # known user, inline history
    ]

    def feedback(n: int, user: str | None, doc: dict) -> None:
        if user is None:
            return  # history-only: no user id to sign feedback with
        event = "conversion" if n % 3 == 0 else "click"
        fb = {"request_id": doc["request_id"], "user_id": user, "event": event}
        r = c.post("/v1/feedback", json={**fb, "item_id": doc["items"][0]["item_id"]})
        assert r.status_code == 200, r.text

    # feedback right after its retrieve, as a real client's comes: the time split then has
    # clicks in every part
    for n, b in enumerate(bodies):
        r = c.post("/v1/retrieve", json=b)
        assert r.status_code == 200, r.text
        feedback(n, b.get("user_id"), r.json())
    users = [{"user_id": "u2"}, {"user_id": "nobody-3"}, {"history": ["i7"]}]
    r = c.post("/v1/retrieve/batch", json={"users": users, "k": 4, "scenario": "exp"})
    assert r.status_code == 200, r.text
    for u, res in zip(users, r.json()["results"], strict=True):
        feedback(0, u.get("user_id"), res)
    svc.stop()

    data = service_runs[0].parent / "data"
    ds_dir = tmp_path / "ds"
    shutil.copytree(log_dir / "events", ds_dir / "events")
    for t in ("users.parquet", "items.parquet"):
        shutil.copy(data / t, ds_dir / t)
    logged = sum(pq.read_metadata(p).num_rows for p in (ds_dir / "events").glob("part-*.parquet"))
    ds = load_dataset(ds_dir)
    assert ds.skipped["cold-start (unknown user)"] >= 5 + 4  # nobody-1, nobody-3 served + feedback
    assert ds.skipped["history-only (no user id)"] == 5 + 4
    assert ds.skipped["user not in users.parquet"] >= 5  # nobody-2: not cold (it had a history)
    assert ds.events.num_rows + sum(ds.skipped.values()) == logged

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "csmf.cli", "train", "--config", str(cfg), "--data", str(ds_dir)]
    p = subprocess.run(
        [*cmd, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning:" in p.stderr and "event log, skipped" in p.stderr
    assert (out / "checkpoint.pt").exists()

    # out of core (train.data = "stream"): the same rows skipped, the same log trains
    streamed = subprocess.run(
        [*cmd, "--out", str(tmp_path / "run-streamed"), "--no-progress",
         "--set", 'train.data="stream"'],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert "streamed from Parquet" in streamed.stdout + streamed.stderr
    skipped_line = next(ln for ln in p.stderr.splitlines() if "event log, skipped" in ln)
    assert skipped_line in streamed.stderr
    assert (tmp_path / "run-streamed" / "checkpoint.pt").exists()
