"""A tiny end-to-end train + eval through the CLI functions the ``csmf`` command mounts."""

import json

import pytest
import typer
from typer.testing import CliRunner

from csmf.checkpoint import dataset_files, dataset_fingerprint, load_checkpoint, vocab_hash
from trainer import cli

runner = CliRunner()


def _app(fn):
    app = typer.Typer()
    app.command()(fn)
    return app


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config_path, tiny_data):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    res = runner.invoke(
        cli.app,
        ["train", "--config", str(tiny_config_path), "--data", str(tiny_data), "--out", str(out),
         "--seed", "3", "--set", "train.epochs=1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "checkpoint at" in res.output and "CPP kept/units per layer" in res.output
    # progress on, stderr not a terminal: no bar redraws, one line per epoch instead
    assert "\r" not in res.output and "step/s" not in res.output
    assert "stage 0 (exposure) epoch 1/1: loss " in res.output
    assert "stage 1 (click) AR epoch 1/1: loss " in res.output
    return out


def test_train_writes_checkpoint_with_dataset_config_and_metrics(run_dir, tiny_data):
    ckpt = load_checkpoint(run_dir)
    assert ckpt.dataset == str(tiny_data.resolve())
    assert ckpt.objectives == ("exposure", "click", "conversion")
    assert ckpt.train_config["train"]["seed"] == 3
    assert len(ckpt.metrics["stages"]) == 3
    assert (run_dir / "train_metrics.json").exists()
    ckpt.build_model()  # owners consistent
    # provenance for `csmf build-index` (tests/index_builder/test_provenance.py)
    prov = ckpt.provenance
    assert prov["dataset_fingerprint"] == dataset_fingerprint(dataset_files(tiny_data))
    assert prov["item_vocab_hash"] == vocab_hash(ckpt.item_vocab)
    assert prov["items"] == len(ckpt.item_vocab.ids.values)


def test_eval_prints_table_and_writes_json(run_dir):
    res = runner.invoke(
        _app(cli.evaluate), ["--run", str(run_dir), "--weights", "1,2,0", "--n", "5"]
    )
    assert res.exit_code == 0, res.output
    assert "fused" in res.output and "popularity (exposures)" in res.output
    data = json.loads((run_dir / "eval.json").read_text())
    assert data["n"] == 5 and data["weights"] == [1.0, 2.0, 0.0]
    assert set(data["metrics"]) == {"click", "conversion"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "cascade.tau=2"], "cascade.tau must be in"),
        (["--data", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_config_or_data_is_one_error_line_exit_2(
    args, message, tiny_config_path, tiny_data, tmp_path
):
    base = [
        "--config",
        str(tiny_config_path),
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "r"),
    ]
    res = runner.invoke(_app(cli.train), base + args)
    assert res.exit_code == 2
    assert res.output.strip().startswith("error:") and message in res.output


def test_eval_bad_weights(run_dir):
    res = runner.invoke(_app(cli.evaluate), ["--run", str(run_dir), "--weights", "1,x,1"])
    assert res.exit_code == 2 and "error:" in res.output
    res = runner.invoke(_app(cli.evaluate), ["--run", str(run_dir), "--weights", "1,1"])
    assert res.exit_code == 2 and "expected 3 weights" in res.output
