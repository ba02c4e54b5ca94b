"""`csmf build-index` refuses an item table or a dataset folder the checkpoint was not
trained on. The run records its dataset fingerprint and vocabulary hashes with the same function
the trainer calls (`training_provenance`; tests/trainer/test_cli.py checks the trainer does)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fixtures.bundles import make_dataset, make_run
from typer.testing import CliRunner

from csmf.bundle import read_manifest
from csmf.checkpoint import (
    dataset_files,
    dataset_fingerprint,
    load_checkpoint,
    save_checkpoint,
    training_provenance,
)
from csmf.errors import DataError
from index_builder.build import build_bundle
from index_builder.cli import app
from index_builder.config import BuildConfig

FLAT = BuildConfig(index="flat")


def _recorded_run(root, data):
    """A run whose checkpoint records its dataset's provenance, as `csmf train` writes it (whose
    item vocabulary is the dataset's whole item table: make_run leaves 20 out, so they go)."""
    run = make_run(root, data)
    ckpt = load_checkpoint(run)
    items = pq.read_table(data / "items.parquet")
    known = pa.array(ckpt.item_vocab.ids.values)
    pq.write_table(items.filter(pc.is_in(items.column("item_id"), known)), data / "items.parquet")
    ckpt.provenance = training_provenance(data, ckpt.user_vocab, ckpt.item_vocab)
    save_checkpoint(ckpt, run / "checkpoint.pt")
    return run


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    data = make_dataset(root / "data", n_users=30, n_items=500, n_events=600)
    return data, _recorded_run(root / "run", data)


def _build(args):
    return CliRunner().invoke(app, ["build-index", *map(str, args), "--index", "flat", "--quiet"])


def test_unknown_items_refused_with_counts_then_indexed_as_cold_when_allowed(small, tmp_path):
    data, run = small
    items = pq.read_table(data / "items.parquet")
    ids = items.column("item_id").to_pylist()
    assert len(ids) == 480  # the vocabulary's
    new = items.slice(0, 100).set_column(0, "item_id", pa.array([f"new{j}" for j in range(100)]))
    other = pa.concat_tables([items.slice(0, 400), new])  # 400 known + 100 unknown ids
    pq.write_table(other, tmp_path / "other-items.parquet")
    out = tmp_path / "bundle"
    r = _build(["--run", run, "--out", out, "--items", tmp_path / "other-items.parquet"])
    assert r.exit_code == 2, r.output
    assert "has 100 of 500 item ids (20.0%) that the model was not trained on" in r.output
    assert "--allow-unknown-items" in r.output and "Traceback" not in r.output
    assert not out.exists()  # nothing published
    r = _build(["--run", run, "--out", out, "--items", tmp_path / "other-items.parquet",
                "--allow-unknown-items"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: item table" in r.output and "indexed as cold items" in r.output
    m = read_manifest(out)
    assert m.item_count == 500 and m.source["provenance"]["unknown_items"] == 100
    assert set(pq.read_table(out / "items.parquet").column(0).to_pylist()) >= {"new0", "new99"}


def test_own_items_and_unchanged_dataset_build_without_warnings(small, tmp_path):
    data, run = small
    r = _build(["--run", run, "--out", tmp_path / "b"])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    prov = read_manifest(tmp_path / "b").source["provenance"]
    assert (
        prov["dataset_fingerprint"]
        == prov["trained_fingerprint"]
        == (dataset_fingerprint(dataset_files(data)))
    )


def test_replaced_dataset_refused_naming_both_fingerprints(tmp_path):
    data = make_dataset(tmp_path / "data", n_users=30, n_items=500, n_events=600)
    run = _recorded_run(tmp_path / "run", data)
    trained = load_checkpoint(run).provenance["dataset_fingerprint"]
    # the folder is replaced by another dataset with the same item ids (so no id is unknown)
    other = make_dataset(tmp_path / "other", n_users=30, n_items=500, n_events=600, seed=7)
    shutil.copy(other / "events.parquet", data / "events.parquet")
    now = dataset_fingerprint(dataset_files(data))
    assert now != trained
    with pytest.raises(DataError) as err:
        build_bundle(run, tmp_path / "b", FLAT, progress=False)
    msg = str(err.value)
    assert trained in msg and now in msg and "events.parquet" in msg
    assert "--allow-dataset-change" in msg and not (tmp_path / "b").exists()
    r = _build(["--run", run, "--out", tmp_path / "b", "--allow-dataset-change"])
    assert r.exit_code == 0, r.output
    assert f"warning: dataset {data} has fingerprint {now}" in r.output


def test_old_checkpoint_without_fingerprint_is_a_warning(tiny_run, tmp_path):
    assert load_checkpoint(tiny_run).provenance == {}
    r = _build(["--run", tiny_run, "--out", tmp_path / "b"])
    assert r.exit_code == 0, r.output
    assert "warning: checkpoint" in r.output and "records no dataset fingerprint" in r.output
    # its vocabulary leaves 20 items out (fixtures.bundles.make_run): counted, not fatal
    assert "has 20 of 1,500 item ids (1.3%) that the model was not trained on" in r.output
    assert "predates provenance records" in r.output


def test_fingerprint_covers_event_partitions(tmp_path):
    data = make_dataset(tmp_path / "d", n_users=10, n_items=20, n_events=40)
    (data / "events").mkdir()
    shutil.move(data / "events.parquet", data / "events" / "part-0.parquet")
    before = dataset_files(data)
    assert "events/part-0.parquet" in before and "items.parquet" in before
    (data / "dataset.json").write_text("{}")  # metadata is not content
    assert dataset_files(data) == before
    pq.write_table(
        pq.read_table(data / "events" / "part-0.parquet").slice(1),
        data / "events" / "part-1.parquet",
    )
    assert dataset_fingerprint(dataset_files(data)) != dataset_fingerprint(before)
