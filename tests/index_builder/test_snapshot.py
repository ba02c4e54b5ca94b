"""The snapshot's history rule reproduces the trainer's per-user time split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.bundles import SPEC

from csmf.bundle import UserSnapshot
from csmf.features import FeatureSpec
from index_builder.snapshot import build_user_snapshot, train_mask


@pytest.mark.parametrize(
    "split",
    [
        dict(val_frac=0.1, test_frac=0.2, min_events=3),
        dict(val_frac=0.0, test_frac=0.5, min_events=1),
    ],
)
def test_train_mask_equals_the_trainers_split(split):
    dataset = pytest.importorskip("trainer.data.dataset")
    rng = np.random.default_rng(1)
    n = 3000
    users = rng.integers(0, 150, n)
    ts = rng.integers(0, 40, n)
    events = pa.table({"user_id": [f"u{u}" for u in users], "timestamp": ts})
    ref = dataset.split_by_time(events, **split).train
    order, keep = train_mask(users, ts, split)
    np.testing.assert_array_equal(np.sort(order[keep]), ref)


def test_history_all_and_click_source(tiny_dataset, tmp_path):
    spec = FeatureSpec.from_dict(SPEC).user
    info = build_user_snapshot(tiny_dataset, spec, tmp_path / "all.parquet", history="all")
    events = pq.read_table(tiny_dataset / "events.parquet")
    assert info["history_events"] == events.num_rows
    snap = UserSnapshot.load(tmp_path / "all.parquet", "user_id")
    ev = events.to_pylist()
    mine = sorted(
        (e["timestamp"], i, e["item_id"]) for i, e in enumerate(ev) if e["user_id"] == "u4"
    )
    assert snap.get("u4")[1] == [it for _, _, it in mine]

    clicks = FeatureSpec.from_dict(
        {**SPEC, "user": {**SPEC["user"], "history": {"max_len": 6, "dim": 8, "source": "click"}}}
    ).user
    info = build_user_snapshot(tiny_dataset, clicks, tmp_path / "clk.parquet", history="all")
    assert info["history_events"] == sum(e["clicked"] for e in ev)


def test_events_folder_gives_the_same_histories_as_one_file(tiny_dataset, tmp_path):
    """Events may be a folder of part files (the synthetic generator writes those;
    docs/design.md#the-dataset-folder)."""
    import shutil

    folder = tmp_path / "ds"
    shutil.copytree(tiny_dataset, folder)
    events = pq.read_table(folder / "events.parquet")
    (folder / "events.parquet").unlink()
    (folder / "events").mkdir()
    half = events.num_rows // 2
    pq.write_table(events.slice(0, half), folder / "events" / "part-00000.parquet")
    pq.write_table(events.slice(half), folder / "events" / "part-00001.parquet")
    spec = FeatureSpec.from_dict(SPEC).user
    a = build_user_snapshot(tiny_dataset, spec, tmp_path / "file.parquet")
    b = build_user_snapshot(folder, spec, tmp_path / "folder.parquet")
    assert a["history_events"] == b["history_events"] > 0
    one = UserSnapshot.load(tmp_path / "file.parquet", "user_id")
    parts = UserSnapshot.load(tmp_path / "folder.parquet", "user_id")
    for uid in one.ids:
        assert one.get(uid) == parts.get(uid)
