"""Two days of a tiny learnable dataset (tests/fixtures/trained.py's segments and topics) for
``csmf daily``: day 1 holds the first two thirds of each user's events and only the users and
items seen by then; day 2 holds everything, so it brings new events, users and items (the gate
re-indexes the serving model's id tables to them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fixtures.services import ROOT
from fixtures.trained import CONFIG, make_structured_dataset

DAY1_BEFORE = 1_160  # timestamps are 1000 + 10 k + (u % 3) for the k-th event of user u
# Recall@50 of a 120-item catalogue is ~1 for any model; the latest 40 s of event time are each
# user's last 4 events (day 1: 12-15 of 16, day 2: 20-23 of 24)
PERIOD_S = 40.0
GATE = ["--n", "10", "--period-s", str(PERIOD_S)]


@pytest.fixture(scope="session")
def days(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("daily-data")
    full = make_structured_dataset(root / "day2")
    day1 = root / "day1"
    day1.mkdir()
    events = pq.read_table(full / "events.parquet")
    users = [f"u{u}" for u in range(60)]
    keep = pc.and_(
        pc.less(events["timestamp"], DAY1_BEFORE), pc.is_in(events["user_id"], pa_strings(users))
    )
    events = events.filter(keep)
    pq.write_table(events, day1 / "events.parquet")
    seen_items = pc.unique(events["item_id"])
    for name, col, ids in (
        ("users", "user_id", pa_strings(users)),
        ("items", "item_id", seen_items),
    ):
        t = pq.read_table(full / f"{name}.parquet")
        pq.write_table(t.filter(pc.is_in(t[col], ids)), day1 / f"{name}.parquet")
    (root / "config.toml").write_text(CONFIG.replace("epochs = [4, 4, 4]", "epochs = [2, 2, 2]"))
    return {"day1": day1, "day2": full, "config": root / "config.toml"}


@pytest.fixture(scope="session")
def day1_state(tmp_path_factory, days) -> Path:
    """A state folder after day 1 (trained from scratch, published), made once, in-process."""
    from daily.gate import GateConfig
    from daily.update import OK, DailyOptions, run_daily

    state = tmp_path_factory.mktemp("daily-day1") / "state"
    opts = DailyOptions(
        state=state, data=days["day1"], config=days["config"], gate=GateConfig(n=10),
        period_s=PERIOD_S,
    )  # fmt: skip
    outcome = run_daily(opts, log=lambda _: None)
    assert outcome.code == OK, outcome.message
    return state


@pytest.fixture
def state(tmp_path, day1_state) -> Path:
    """A private copy of the day-1 state (the pointer is a relative symlink: copied as one)."""
    shutil.copytree(day1_state, tmp_path / "state", symlinks=True)
    return tmp_path / "state"


def pa_strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def daily_cmd(state: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "csmf.cli", "daily", "--state", str(state), "--data", str(data),
            *GATE, *args]  # fmt: skip


def run_daily_cli(state: Path, data: Path, *args: str, env: dict | None = None):
    """`csmf daily` in a subprocess (the real CLI, exit code and all)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CSMF_")}
    full_env.update(env or {})
    return subprocess.run(
        daily_cmd(state, data, *args), capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=full_env,
    )  # fmt: skip
