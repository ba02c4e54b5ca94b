"""Out-of-core data (trainer.data.stream): the streamed split equals the in-memory split exactly,
every train positive is seen once per epoch through the shuffle buffer, ranks read disjoint shards,
bad chunks fail with the loader's messages, and a streamed cascade trains and evaluates."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from csmf.errors import DataError
from trainer.config import load_config
from trainer.data.dataset import load_dataset, split_by_time
from trainer.data.stream import count_events, event_parts, open_stream
from trainer.pipeline import eval_run, prepare, train_run, use_stream


def _as_parts(
    src: Path, dst: Path, rows_per_file: int, rows_per_group: int, drop: float = 0.0
) -> Path:
    """The same dataset with events in several files of several row groups each (and a random
    ``drop`` fraction of events removed, so users have different event counts)."""
    shutil.copytree(src, dst)
    events = pq.read_table(dst / "events.parquet")
    if drop:
        events = events.filter(pa.array(np.random.default_rng(3).random(events.num_rows) >= drop))
    (dst / "events.parquet").unlink()
    (dst / "events").mkdir()
    for k, lo in enumerate(range(0, events.num_rows, rows_per_file)):
        pq.write_table(
            events.slice(lo, rows_per_file),
            dst / "events" / f"part-{k:05d}.parquet",
            row_group_size=rows_per_group,
        )
    return dst


@pytest.fixture(scope="module")
def parted(tiny_data, tmp_path_factory) -> Path:
    return _as_parts(tiny_data, tmp_path_factory.mktemp("parted") / "data", 300, 70, 0.3)


def _open(cfg, root, **kw):
    return open_stream(root, cfg.features, cfg.objectives, asdict(cfg.split), **kw)


@pytest.mark.parametrize("budget", [10**9, 97])  # one pass, and many user buckets
@pytest.mark.parametrize(
    "split", [{}, {"val_frac": 0.0, "test_frac": 0.5, "min_events": 21}, {"val_frac": 0.3}]
)
def test_streamed_split_equals_the_in_memory_split(tiny_cfg, parted, budget, split):
    args = {**asdict(tiny_cfg.split), **split}
    assert len(event_parts(parted)[0]) > 10  # the split really crosses row groups and files
    mem = split_by_time(load_dataset(parted).events, **args)
    labels = np.zeros(count_events(parted), np.int8)
    labels[mem.val], labels[mem.test] = 1, 2
    enc = open_stream(parted, tiny_cfg.features, tiny_cfg.objectives, args, budget=budget)
    streamed = enc.stream.labels()
    assert (streamed == 2).sum() > 0  # the split is not trivially all train
    np.testing.assert_array_equal(streamed, labels)
    assert enc.split_sizes() == (len(mem.train), len(mem.val), len(mem.test))


def test_split_ties_keep_row_order(tiny_cfg, tmp_path):
    """Equal timestamps: the later row is the later event, across row groups."""
    root = _as_parts(make_flat(tmp_path / "src"), tmp_path / "flat", 4, 2)
    mem = split_by_time(load_dataset(root).events, **asdict(tiny_cfg.split))
    enc = _open(tiny_cfg, root, budget=3)
    labels = np.zeros(count_events(root), np.int8)
    labels[mem.val], labels[mem.test] = 1, 2
    np.testing.assert_array_equal(enc.stream.labels(), labels)


def make_flat(root: Path) -> Path:
    """Two users, every event at the same timestamp (only row order decides the split)."""
    from tests.trainer.conftest import make_tiny_dataset

    make_tiny_dataset(root, n_users=4)
    ev = pq.read_table(root / "events.parquet")
    ev = ev.set_column(2, "timestamp", pa.array(np.full(ev.num_rows, 7, np.int64)))
    pq.write_table(ev, root / "events.parquet")
    return root


def _epoch_rows(ex, seed: int, batch_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.stack([b.part.user, b.part.item], 1) for b in ex.batches(rng, batch_size)]


@pytest.mark.parametrize("held", [0, 10_000], ids=["streamed", "held-in-memory"])
def test_every_train_positive_once_per_epoch_and_ranks_disjoint(tiny_cfg, parted, held):
    """Streamed through a shuffle buffer, or (``train.cache_examples``) read once and shuffled
    in memory: the same examples, every one once per epoch, disjoint across ranks."""
    mem = prepare(tiny_cfg, parted)
    from trainer.encoding import stage_examples

    kw = {"shuffle_buffer": 50, "cache_examples": held}
    for objective in ("exposure", "click"):
        want = stage_examples(mem, objective)
        expected = sorted(map(tuple, np.stack([want.user, want.item], 1).tolist()))
        # one process, a buffer smaller than the data: the batches cover every example once
        one = _open(tiny_cfg, parted, **kw).stream.examples(objective)
        batches = _epoch_rows(one, 0, 32)
        got = sorted(map(tuple, np.concatenate(batches).tolist()))
        assert got == expected
        assert len(one) == len(want) and len(batches) == one.steps(32)
        assert all(len(b) <= 32 for b in batches)
        # shuffled: not the file order, and a different order in another epoch
        flat = np.concatenate(batches)
        assert not np.array_equal(flat, np.stack([want.user, want.item], 1))
        assert not np.array_equal(flat, np.concatenate(_epoch_rows(one, 1, 32)))
        np.testing.assert_array_equal(flat, np.concatenate(_epoch_rows(one, 0, 32)))
        # two ranks: disjoint shards covering everything, the same number of steps each
        shards = [
            _open(tiny_cfg, parted, rank=r, world=2, **kw).stream.examples(objective)
            for r in range(2)
        ]
        assert all((s.held() is not None) == bool(held) for s in [one, *shards])
        per_rank = [_epoch_rows(s, 0, 16) for s in shards]
        assert len(per_rank[0]) == len(per_rank[1]) == shards[0].steps(16)
        rows = [sorted(map(tuple, np.concatenate(p).tolist())) for p in per_rank]
        assert min(len(r) for r in rows) > 0
        assert sorted(rows[0] + rows[1]) == expected


@pytest.mark.parametrize("held", [0, 10_000], ids=["streamed", "held-in-memory"])
def test_subset_is_a_fraction_and_counted_per_rank(tiny_cfg, parted, held):
    ex = _open(tiny_cfg, parted, shuffle_buffer=40, cache_examples=held).stream.examples("exposure")
    ex.held()
    sub = ex.subset(0.5, 123)
    streamed = _open(tiny_cfg, parted, shuffle_buffer=40).stream.examples("exposure")
    assert len(sub) == len(streamed.subset(0.5, 123))  # the same hash subset either way
    rows = np.concatenate(_epoch_rows(sub, 0, 16))
    assert len(rows) == len(sub) and 0.35 * len(ex) < len(sub) < 0.65 * len(ex)
    again = np.concatenate(_epoch_rows(ex.subset(0.5, 123), 5, 16))
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, again.tolist()))


def test_bad_chunks_fail_like_the_loader(tiny_cfg, tiny_data, tmp_path):
    root = _as_parts(tiny_data, tmp_path / "bad", 300, 100)
    part = root / "events" / "part-00002.parquet"
    ev = pq.read_table(part)
    converted = ev["converted"].to_numpy(zero_copy_only=False).copy()
    clicked = ev["clicked"].to_numpy(zero_copy_only=False)
    converted[np.flatnonzero(~clicked)[:2]] = True
    pq.write_table(ev.set_column(4, "converted", pa.array(converted)), part)
    with pytest.raises(DataError, match=r"part-00002\.parquet.*converted=true but clicked=false"):
        _open(tiny_cfg, root)
    ev = ev.set_column(0, "user_id", pa.array(np.full(ev.num_rows, 99_999, np.int64)))
    pq.write_table(ev, part)
    with pytest.raises(DataError, match=r"user_id not in users\.parquet \(e\.g\. 99999\)"):
        _open(tiny_cfg, root)


def test_auto_streams_above_the_threshold(tiny_config_path, parted):
    n = count_events(parted)
    assert use_stream(load_config(tiny_config_path, [f"train.stream_above={n}"]), parted) is False
    assert use_stream(load_config(tiny_config_path, [f"train.stream_above={n - 1}"]), parted)
    assert not use_stream(load_config(tiny_config_path, ['train.data="memory"']), parted)
    assert use_stream(load_config(tiny_config_path, ['train.data="stream"']), parted)


def test_streamed_cascade_trains_and_evaluates(tiny_config_path, parted, tmp_path):
    """A real streamed run (bounded buffer, history feature, candidates, AR subset) writes a
    checkpoint that evaluates, with quality near the in-memory run's on the same data."""
    results = {}
    for mode in ("stream", "memory"):
        cfg = load_config(
            tiny_config_path,
            [f'train.data="{mode}"', "train.shuffle_buffer=100", "train.threads=1", "eval.n=5"],
        )
        out = tmp_path / mode
        _, metrics = train_run(cfg, parted, out, log=lambda _: None, progress=False)
        assert metrics["data"] == mode
        results[mode] = eval_run(out)["metrics"]
    saved = json.loads((tmp_path / "stream" / "train_metrics.json").read_text())
    assert saved["data"] == "stream" and len(saved["stages"]) == 3
    for target in ("click", "conversion"):
        s, m = results["stream"][target]["fused"], results["memory"][target]["fused"]
        pop = results["memory"][target]["popularity (exposures)"]
        assert s["recall"] > pop["recall"]  # it learned something beyond popularity
        assert abs(s["recall"] - m["recall"]) < 0.1
