"""Resume after a kill, atomic per-epoch/per-stage checkpoints, no silent overwrite, device."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from csmf.checkpoint import load_checkpoint, new_model
from trainer import cli
from trainer.cascade import Phase, run_cascade
from trainer.config import load_config
from trainer.pipeline import (
    RESUME_NAME,
    _progress_from,
    _progress_to,
    prepare,
    resolve_device,
    train_run,
)

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
# stage 1 is long enough to be killed in the middle of its training epochs
KILL_SETS = ["train.threads=1", "train.epochs=[2,40,1]"]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(metrics: dict) -> list:
    return [(s["loss"], s.get("ar_loss")) for s in metrics["stages"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config_path, tiny_data):
    """The uninterrupted run, in process."""
    cfg = load_config(tiny_config_path, KILL_SETS)
    out = tmp_path_factory.mktemp("ref") / "run"
    train_run(cfg, tiny_data, out, log=lambda _: None, progress=False)
    return load_checkpoint(out)


def test_sigkilled_run_resumes_to_the_bit_identical_result(
    reference, tmp_path, tiny_config_path, tiny_data
):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", str(tiny_config_path),
           "--data", str(tiny_data), "--out", str(out), "--no-progress"]  # fmt: skip
    for s in KILL_SETS:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    killed_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / RESUME_NAME).exists():
            p = torch.load(out / RESUME_NAME, weights_only=True)["progress"]
            if p["stage"] >= 1 and not (
                p["stage"] == 1 and p["phase"] == "train" and p["epoch"] < 2
            ):
                proc.send_signal(signal.SIGKILL)  # after stage 0's checkpoint, mid stage 1
                killed_at = (p["stage"], p["phase"], p["epoch"])
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_at is not None, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists() and (out / RESUME_NAME).exists()

    # a plain re-run into the folder is refused: it holds an interrupted run
    res = runner.invoke(
        cli.app, ["train", "--config", str(tiny_config_path), "--data", str(tiny_data),
                  "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 2 and "interrupted run" in res.output and "--resume" in res.output

    res = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--resume", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout
    done = load_checkpoint(out)
    assert not (out / RESUME_NAME).exists()
    # bit-identical: same owners/masks, same weights, same per-epoch losses and val metrics
    assert _same_state(done.state_dict, reference.state_dict), killed_at
    assert _losses(done.metrics) == _losses(reference.metrics)
    assert [s["val_recall"] for s in done.metrics["stages"]] == [
        s["val_recall"] for s in reference.metrics["stages"]
    ]
    assert done.metrics["resumed_from"]["stage"] == killed_at[0]


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_resume_from_any_epoch_or_stage_boundary_is_bit_identical(tiny_cfg, tiny_data, stream):
    """In process: every kind of resume point (mid-train, mid-recovery, stage frozen), with the
    progress round-tripped through the on-disk format; in memory and streamed (trainer.data.stream:
    the epoch's row-group order, shuffle buffer and AR subset come from the saved RNG state)."""
    cfg = tiny_cfg

    def fresh():
        torch.manual_seed(cfg.train.seed)
        enc = prepare(cfg, tiny_data, stream=stream)
        return enc, new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)

    points = []

    def keep(p):
        buf = io.BytesIO()
        torch.save({"p": _progress_to(p), "s": model.state_dict()}, buf)
        points.append(buf.getvalue())

    enc, model = fresh()
    full = run_cascade(model, enc, cfg, log=lambda _: None, progress=False, on_checkpoint=keep)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = [torch.load(io.BytesIO(b), weights_only=True) for b in points]
    kinds = {}
    for raw in loaded:
        p = _progress_from(raw["p"])
        kinds.setdefault((p.phase, p.stage > 0), raw)
    assert {k[0] for k in kinds} == {Phase.TRAIN, Phase.RECOVER, Phase.FREEZE}
    for raw in kinds.values():
        enc, model = fresh()
        model.load_state_dict(raw["s"])
        got = run_cascade(
            model, enc, cfg, log=lambda _: None, progress=False, resume=_progress_from(raw["p"])
        )
        assert _same_state(model.state_dict(), want)
        assert _losses(got) == _losses(full)
        assert got["output_slices"] == full["output_slices"]


def test_finished_run_is_not_overwritten_without_force(tmp_path, tiny_config_path, tiny_data):
    out = tmp_path / "run"
    args = ["train", "--config", str(tiny_config_path), "--data", str(tiny_data), "--out",
            str(out), "--no-progress", "--set", "train.epochs=0", "--set", "train.ar_epochs=0"]  # fmt: skip
    assert runner.invoke(cli.app, args).exit_code == 0
    before = (out / "checkpoint.pt").read_bytes()
    res = runner.invoke(cli.app, [*args, "--seed", "5"])
    assert res.exit_code == 2 and "already holds a finished run" in res.output
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    res = runner.invoke(cli.app, [*args, "--seed", "5", "--force"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out).train_config["train"]["seed"] == 5
    res = runner.invoke(cli.app, ["train", "--resume", str(out)])
    assert res.exit_code == 2 and "already finished" in res.output
    res = runner.invoke(cli.app, ["train", "--resume", str(out), "--set", "train.lr=1"])
    assert res.exit_code == 2 and "--resume takes the run's own config" in res.output
    res = runner.invoke(cli.app, ["train", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no interrupted run to resume" in res.output


def test_device_option(tmp_path, tiny_config_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="train.device must be one of"):
        load_config(tiny_config_path, ["train.device=tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")


def test_training_on_an_explicit_device_records_it(tmp_path, tiny_config_path, tiny_data):
    cfg = load_config(tiny_config_path, ["train.device=cpu", "train.epochs=1", "train.ar_epochs=0"])
    _, metrics = train_run(cfg, tiny_data, tmp_path / "run", log=lambda _: None, progress=False)
    assert metrics["device"] == "cpu" and metrics["processes"] == 1
    assert np.isfinite(metrics["stages"][0]["loss"]).all()


class _Stop(Exception):
    pass


def test_resume_refuses_a_changed_dataset(tmp_path, tiny_cfg, tiny_data):
    import shutil

    import pyarrow.parquet as pq

    from trainer.pipeline import RunFolderError, resume_config, resume_run

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cfg = tiny_cfg

    def log(msg: str) -> None:
        if msg.startswith("stage 1"):  # stage 0 froze and was checkpointed
            raise _Stop

    with pytest.raises(_Stop):
        train_run(cfg, data, tmp_path / "run", log=log, progress=False)
    assert (tmp_path / "run" / RESUME_NAME).exists()
    assert resume_config(tmp_path / "run").to_dict() == cfg.to_dict()
    events = pq.read_table(data / "events.parquet")
    pq.write_table(events.slice(1), data / "events.parquet")
    with pytest.raises(RunFolderError, match="changed since the run started"):
        resume_run(tmp_path / "run", log=lambda _: None, progress=False)
