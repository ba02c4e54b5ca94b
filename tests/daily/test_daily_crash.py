"""A `csmf daily` killed (SIGKILL: no cleanup code runs) in the middle of an update leaves the
serving bundle, the previous run and the pointer exactly as they were, and a clearly named
partial-<gen> folder that the next update removes, saying so, before it publishes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import pytest
from fixtures.services import ROOT, wait_until

from csmf.bundle import load_bundle
from daily.state import State

from .conftest import daily_cmd, run_daily_cli

pytestmark = pytest.mark.slow


def digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def partial_step(state) -> str | None:
    for p in state.glob("partial-*/step"):
        return p.read_text().strip()
    return None


def start(state, data, log_path):
    with log_path.open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(daily_cmd(state, data, "--margin", "0.5"), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip


def kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "killed mid-update, not after it finished"


def test_killed_mid_update_leaves_the_serving_model_intact(days, state, tmp_path):
    st = State(state)
    gen1 = st.current()
    before = {"run": digest(st.run_of(gen1)), "bundle": digest(st.bundle_of(gen1))}

    # 1. killed mid-training (the warm start)
    proc = start(state, days["day2"], tmp_path / "kill1.log")
    wait_until(lambda: partial_step(state) == "train", 300, "the train step", interval=0.005)
    kill(proc)
    assert st.current() == gen1
    assert digest(st.run_of(gen1)) == before["run"]
    assert digest(st.bundle_of(gen1)) == before["bundle"]
    load_bundle(st.bundle_of(gen1), verify=True).close()
    [partial] = state.glob("partial-*")  # one clearly named partial folder
    assert partial_step(state) == "train"

    # 2. the next update reports and removes it, then is killed in a late step (build, or
    # publish/reload if the build's ~0.2 s went by between two polls)
    log2 = tmp_path / "kill2.log"
    proc = start(state, days["day2"], log2)
    late = {"build", "publish", "reload"}
    wait_until(lambda: partial_step(state) in late, 300, "the build step", interval=0.005)
    kill(proc)
    text = log2.read_text()
    killed = partial.name[len("partial-") :]
    assert (
        f"warning: an earlier update ({killed}) stopped during its 'train' step without "
        f"publishing; removed partial-{killed}, data/{killed}"
    ) in text
    assert "the serving model was not touched" in text
    assert not partial.exists()
    # Whatever instant the kill hit, the pointer names a complete, verified generation: the old
    # one untouched (not committed yet) or the new one (the kill came after the commit).
    gen = st.current()
    load_bundle(st.bundle_of(gen), verify=True).close()
    assert digest(st.run_of(gen1)) == before["run"]
    assert digest(st.bundle_of(gen1)) == before["bundle"]

    # 3. a clean run recovers and publishes; nothing of the killed updates is left over
    again = run_daily_cli(state, days["day2"], "--margin", "0.5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "warning: an earlier update" in again.stderr
    assert not list(state.glob("partial-*"))
    assert digest(st.run_of(gen1)) == before["run"]  # kept as a previous generation
    gens = {p.name for p in (state / "runs").iterdir()}
    assert gens == {p.name for p in (state / "data").iterdir()}, "no orphaned snapshot"
    assert gens | {"current"} == {p.name for p in (state / "bundles").iterdir()}
