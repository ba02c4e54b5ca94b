"""Bad input to `csmf daily` is one `error:` line and exit code 2 before anything is trained:
no snapshot, no run, no partial folder, the serving model untouched — and the attempt is
recorded in status.json (the metrics then say the last run failed)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from csmf.cli import main
from daily.state import State

from .conftest import GATE


def csmf_daily(capsys, state: Path, data: Path, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["daily", "--state", str(state), "--data", str(data), *GATE, *args])
    return exc.value.code, capsys.readouterr().err


def copy_day(src: Path, dst: Path, events=None) -> Path:
    shutil.copytree(src, dst)
    if events is not None:
        table = events(pq.read_table(src / "events.parquet"))
        pq.write_table(table, dst / "events.parquet")
    return dst


def nothing_trained(state: Path, gens_before: set[str]) -> None:
    assert not list(state.glob("partial-*"))
    if (state / "runs").exists():
        assert {p.name for p in (state / "runs").iterdir()} == gens_before
        assert {p.name for p in (state / "data").iterdir()} == gens_before


def test_first_update_needs_a_config(capsys, days, tmp_path):
    code, err = csmf_daily(capsys, tmp_path / "state", days["day1"])
    assert code == 2
    assert "error: " in err and "no serving model yet" in err and "needs --config" in err
    nothing_trained(tmp_path / "state", set())
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["last_attempt"]["outcome"] == "failed" and status["last_success"] is None


@pytest.mark.parametrize(
    "case, events, message",
    [
        ("missing column", lambda t: t.drop(["clicked"]), "clicked"),
        (
            "all-zero label",
            lambda t: t.set_column(
                t.schema.get_field_index("converted"), "converted", pa.array([False] * t.num_rows)
            ),
            "conversion",
        ),
    ],  # fmt: skip
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_bad_event_logs_are_refused_before_training(capsys, days, state, tmp_path, case, events,
                                                    message):  # fmt: skip
    gens = {p.name for p in (state / "runs").iterdir()}
    current = State(state).current()
    data = copy_day(days["day2"], tmp_path / "bad", events)
    code, err = csmf_daily(capsys, state, data)
    assert code == 2, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert message in line and "events.parquet" in line, line
    nothing_trained(state, gens)
    assert State(state).current() == current


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", 'cascade.objectives=["exposure","click","basket"]'], "basket"),
        (["--replicas", "http://127.0.0.1:9"], "needs the admin token"),
        (["--replicas", "127.0.0.1:9", "--token", "t"], "must start with http://"),
        (["--replicas-dns", "no-such-host.invalid:8000", "--token", "t"], "cannot resolve"),
        (["--build", "indx=flat"], "BuildConfig field"),
        (["--keep", "1"], "keep must be >= 2"),
        (["--margin", "1.5"], "margin must be in [0, 1)"),
        (["--period-s", "100000"], "covers every event"),
        (["--set", "warm.epochs=-1"], "warm.epochs"),
    ],
    ids=[
        "unknown objective",
        "no token",
        "bad url",
        "unresolvable dns",
        "bad build key",
        "keep",
        "margin",
        "period",
        "warm config",
    ],  # fmt: skip
)
def test_bad_options_are_refused_before_training(capsys, days, state, args, message):
    gens = {p.name for p in (state / "runs").iterdir()}
    code, err = csmf_daily(capsys, state, days["day2"], *args)
    assert code == 2, err
    assert message in err
    nothing_trained(state, gens)


def test_a_config_with_another_feature_spec_is_refused(capsys, days, state, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(days["config"].read_text().replace("dim = 8 }", "dim = 16 }"))
    code, err = csmf_daily(capsys, state, days["day2"], "--config", str(other))
    assert code == 2 and "[features] differ from the serving model's" in err


def test_a_broken_pointer_and_a_missing_serving_run_are_named(capsys, days, state):
    st = State(state)
    gen = st.current()
    shutil.move(st.run_of(gen), state / "elsewhere")
    code, err = csmf_daily(capsys, state, days["day2"])
    assert code == 2 and f"{st.run_of(gen) / 'checkpoint.pt'} is missing" in err
    (state / "bundles" / "current").unlink()
    os.symlink("nowhere", state / "bundles" / "current")
    code, err = csmf_daily(capsys, state, days["day2"])
    assert code == 2 and "points at 'nowhere', which is not a bundle" in err


def test_one_update_at_a_time(capsys, days, state):
    with open(state / ".lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running update holds it
        code, err = csmf_daily(capsys, state, days["day2"])
    assert code == 2 and "another csmf daily is updating" in err
