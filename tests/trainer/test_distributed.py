"""Data-parallel cascade under real torchrun processes (2 × 1 thread, gloo, tiny dataset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from csmf.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.distributed import SINGLE, Dist, model_digest
from trainer.pipeline import eval_run, train_run

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_shard_splits_a_global_batch_without_overlap():
    idx = np.arange(11)
    parts = [Dist(rank=r, world=3).shard(idx) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == idx.tolist()
    assert SINGLE.shard(idx) is idx


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory, tiny_config_path, tiny_data):
    """`csmf train --nproc 2` (launches torchrun) with the global batch of the 1-process run."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--nproc", "2",
         "--config", str(tiny_config_path), "--data", str(tiny_data), "--out", str(out),
         "--set", "train.threads=1", "--set", "train.batch_size=32", "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout and res.stdout.count("checkpoint at") == 1  # rank 0 logs
    return out


def test_two_processes_agree_on_every_stage_boundary(two_procs):
    ckpt = load_checkpoint(two_procs)
    metrics = json.loads((two_procs / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and not (two_procs / "resume.pt").exists()
    stages = ckpt.metrics["stages"]
    for s in stages:
        for what, digests in s["digests"].items():
            assert len(digests) == 2 and digests[0] == digests[1], (s["objective"], what)
    # the last boundary's digest is the checkpoint's own owners + weights
    model = ckpt.build_model()
    assert stages[-1]["digests"]["frozen"][0] == model_digest(model, len(stages) - 1)
    # every layer gave units to the next stage and validation ran (on rank 0)
    assert all(int(g.owner.max()) >= 1 for g in model.unit_groups())
    assert all(np.isfinite(v) for s in stages for v in s["val_recall"].values())


def test_two_processes_match_one_process_quality(two_procs, tmp_path, tiny_config_path, tiny_data):
    cfg = load_config(tiny_config_path, ["train.threads=1"])
    train_run(cfg, tiny_data, tmp_path / "one", log=lambda _: None, progress=False)
    one = eval_run(tmp_path / "one", n=10, write=False)
    two = eval_run(two_procs, n=10, write=False)
    # same seed, data and global batch; per-rank in-batch negatives: within tiny-data noise
    for target in one["metrics"]:
        a, b = one["metrics"][target]["fused"]["recall"], two["metrics"][target]["fused"]["recall"]
        assert abs(a - b) <= 0.15, (target, a, b)
        pop = two["metrics"][target]["popularity (exposures)"]["recall"]
        assert b > pop + 0.2, (target, b, pop)  # the 2-process model learned something real


def test_rank_mismatch_is_a_hard_error(tmp_path, tiny_config_path, tiny_data):
    """Rank 1 perturbs one frozen entry: the checksum all-gather fails on every rank."""
    script = tmp_path / "mismatch.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch
        from csmf.checkpoint import new_model
        from trainer.config import load_config
        from trainer.distributed import RankMismatchError, init_from_env, shutdown
        from trainer.pipeline import prepare

        dist = init_from_env(torch.device("cpu"))
        cfg = load_config({str(tiny_config_path)!r})
        torch.manual_seed(0)
        enc = prepare(cfg, {str(tiny_data)!r})
        model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
        assert len(set(dist.check_consistent(model, 0, "same init"))) == 1
        if dist.rank == 1:
            with torch.no_grad():
                model.user.tables["id"].weight[3, 0] += 1e-6
        try:
            dist.check_consistent(model, 0, "after the perturbation")
        except RankMismatchError as exc:
            open(f"{str(tmp_path)}/rank{{dist.rank}}.txt", "w").write(str(exc))
        shutdown(dist)
        """)
    )
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):  # every rank raised, naming both ranks' digests
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("after the perturbation: ranks disagree"), text
        assert "rank 0: " in text and "rank 1: " in text
