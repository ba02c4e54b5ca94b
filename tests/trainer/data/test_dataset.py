"""load_dataset validation (one test per error kind), the per-user time split, atomic publishing."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csmf.errors import ConfigError, DataError
from csmf.features import FeatureSpec
from trainer.data.dataset import load_dataset, split_by_time, staged_dataset, write_meta

SPEC = FeatureSpec.from_dict(
    {
        "user": {"fields": [{"name": "segment", "kind": "categorical"}]},
        "item": {
            "fields": [
                {"name": "topic", "kind": "categorical"},
                {"name": "tags", "kind": "multi_hot"},
            ]
        },
    }
)


def _raises(match: str):
    return pytest.raises(DataError, match=re.escape(match))


# --------------------------------------------------------------------------- loading


def test_valid_dataset_loads_with_spec_and_meta(make_dataset):
    root = make_dataset()
    write_meta(root, {"name": "tiny"})
    ds = load_dataset(root, SPEC)
    assert ds.counts() == {"users": 3, "items": 4, "exposures": 5, "clicks": 3, "conversions": 1}
    assert ds.meta == {"name": "tiny"}
    assert ds.candidates is None
    assert ds.events.schema.field("user_id").type == pa.int64()


def test_meta_is_empty_without_dataset_json(make_dataset):
    assert load_dataset(make_dataset()).meta == {}


def test_events_folder_of_parts_equals_single_file(make_dataset):
    single = load_dataset(make_dataset()).events
    parted = load_dataset(make_dataset(parts=3)).events
    assert parted.equals(single)


def test_small_integer_and_string_ids_are_normalised(make_dataset):
    root = make_dataset(
        events={
            "user_id": pa.array(["u1", "u1", "u2", "u3", "u3"]),
            "item_id": pa.array([10, 11, 10, 12, 13], pa.int32()),
        },
        users={"user_id": pa.array(["u1", "u2", "u3"])},
        items={"item_id": pa.array([10, 11, 12, 13], pa.int16())},
    )
    ds = load_dataset(root)
    assert ds.events.schema.field("user_id").type == pa.string()
    assert ds.events.schema.field("item_id").type == pa.int64()
    assert ds.items.schema.field("item_id").type == pa.int64()


def test_missing_folder(tmp_path):
    with _raises(f"dataset folder {tmp_path / 'nope'} does not exist"):
        load_dataset(tmp_path / "nope")


def test_missing_users_file(make_dataset):
    root = make_dataset()
    (root / "users.parquet").unlink()
    with _raises("users.parquet: file not found"):
        load_dataset(root)


def test_missing_events(make_dataset):
    root = make_dataset()
    (root / "events.parquet").unlink()
    with _raises("missing events (expected events.parquet or an events/ folder)"):
        load_dataset(root)


def test_both_events_file_and_folder(make_dataset):
    root = make_dataset(parts=2)
    pq.write_table(pq.read_table(root / "events"), root / "events.parquet")
    with _raises("both events.parquet and events/ exist"):
        load_dataset(root)


def test_missing_required_event_column(make_dataset):
    with _raises("events.parquet: missing required column(s) clicked"):
        load_dataset(make_dataset(events={"clicked": None}))


def test_missing_id_column_in_items(make_dataset):
    with _raises("items.parquet: missing required column(s) item_id"):
        load_dataset(make_dataset(items={"item_id": None}))


def test_wrong_dtype_of_flag(make_dataset):
    with _raises("events.parquet: column clicked must be bool, got int64"):
        load_dataset(make_dataset(events={"clicked": [1, 0, 1, 1, 0]}))


def test_wrong_dtype_of_id(make_dataset):
    with _raises("events.parquet: column item_id must be int64 or string, got double"):
        load_dataset(make_dataset(events={"item_id": [10.0, 11.0, 10.0, 12.0, 13.0]}))


def test_wrong_dtype_of_timestamp(make_dataset):
    with _raises("events.parquet: column timestamp must be an integer (int64), got string"):
        load_dataset(make_dataset(events={"timestamp": ["a", "b", "c", "d", "e"]}))


def test_id_types_must_match_across_files(make_dataset):
    with _raises("users.parquet: column user_id is string but events.parquet has user_id as int64"):
        load_dataset(make_dataset(users={"user_id": ["1", "2", "3"]}))


def test_null_ids(make_dataset):
    with _raises("events.parquet: column user_id has 2 null values (e.g. rows 1, 3)"):
        load_dataset(make_dataset(events={"user_id": [1, None, 2, None, 3]}))


def test_null_ids_in_users(make_dataset):
    with _raises("users.parquet: column user_id has 1 null values (e.g. rows 2)"):
        load_dataset(make_dataset(users={"user_id": [1, 2, None]}))


def test_event_items_not_in_items_table(make_dataset):
    events = {"item_id": [10, 99999, 100000, 99999, 13]}
    with _raises("events.parquet: 3 rows have item_id not in items.parquet (e.g. 99999, 100000)"):
        load_dataset(make_dataset(events=events))


def test_event_users_not_in_users_table(make_dataset):
    with _raises("events.parquet: 1 rows have user_id not in users.parquet (e.g. 7)"):
        load_dataset(make_dataset(events={"user_id": [1, 1, 2, 3, 7]}))


def test_unknown_ids_reported_from_parts_too(make_dataset):
    with _raises("events/: 1 rows have item_id not in items.parquet (e.g. 55)"):
        load_dataset(make_dataset(events={"item_id": [10, 11, 10, 12, 55]}, parts=2))


# The service's event log (a `cold_start` column): rows that cannot train are skipped and counted.
LOG_EVENTS = {  # the valid base plus cold, history-only and unknown-id rows
    "user_id": [1, 1, 2, 3, 3, 7, None, 8, 1],
    "item_id": [10, 11, 10, 12, 13, 10, 11, 12, 99],
    "timestamp": [100, 200, 150, 300, 310, 320, 330, 340, 350],
    "clicked": [True, False, True, True, False, True, False, False, True],
    "converted": [True, False, False, False, False, False, False, False, False],
    "request_id": [1, 2, 3, 4, 4, 5, 6, 7, 8],
    "cold_start": [False] * 5 + [True, True, False, False],
}


def test_event_log_rows_that_cannot_train_are_skipped_and_counted(make_dataset, capsys):
    ds = load_dataset(make_dataset(events=LOG_EVENTS, parts=2))
    assert ds.events.num_rows == 5
    assert ds.skipped == {
        "cold-start (unknown user)": 1,
        "history-only (no user id)": 1,
        "user not in users.parquet": 1,
        "item not in items.parquet": 1,
    }
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "event log, skipped 4 of 9 rows" in err


def test_streamed_event_log_skips_the_same_rows_as_the_in_memory_loader(make_dataset, capsys):
    """Out of core, rows that cannot train keep their row number but are labelled skipped: the
    split, the counts and the training positives equal the in-memory loader's."""
    from dataclasses import asdict

    from trainer.config import SplitConfig
    from trainer.data.stream import SKIPPED, open_stream

    root = make_dataset(events=LOG_EVENTS, parts=2)
    mem = load_dataset(root)
    split = split_by_time(mem.events, **asdict(SplitConfig()))
    spec = FeatureSpec.from_dict({"user": {}, "item": {}})
    enc = open_stream(root, spec, ("exposure", "click"), asdict(SplitConfig()))
    err = capsys.readouterr().err
    assert err.count("event log, skipped 4 of 9 rows") == 2  # both loaders, the same words
    assert enc.split_sizes() == (len(split.train), len(split.val), len(split.test))
    labels = enc.stream.labels()
    assert (labels == SKIPPED).sum() == 4 and labels[5:].tolist().count(SKIPPED) == 4
    for objective in ("exposure", "click"):
        ex = enc.stream.examples(objective)
        got = sorted(
            (int(u), int(i))
            for b in ex.batches(np.random.default_rng(0), 4)
            for u, i in zip(b.part.user, b.part.item, strict=True)
        )
        ev = mem.events.take(pa.array(split.train))
        positive = ev["clicked"].to_pylist() if objective == "click" else [True] * ev.num_rows
        users, items = enc.user_vocab.ids.index, enc.item_vocab.ids.index
        want = sorted(
            (users[str(u)] - 2, items[str(i)] - 2)
            for u, i, p in zip(
                ev["user_id"].to_pylist(), ev["item_id"].to_pylist(), positive, strict=True
            )
            if p
        )
        assert got == want


def test_event_log_of_only_untrainable_rows_is_one_error(make_dataset):
    events = {k: v[5:] for k, v in LOG_EVENTS.items()}
    events["converted"][-1] = True  # every label only on rows that cannot train
    with _raises("events.parquet: no rows, so the exposure objective has no positives"):
        load_dataset(make_dataset(events=events))


def test_without_the_marker_unknown_ids_stay_an_error(make_dataset):
    events = {k: v for k, v in LOG_EVENTS.items() if k != "cold_start"}
    events = {k: [x for x, u in zip(v, events["user_id"], strict=True) if u is not None]
              for k, v in events.items()}  # fmt: skip
    with _raises("rows have user_id not in users.parquet"):
        load_dataset(make_dataset(events=events))


def test_converted_without_clicked(make_dataset):
    events = {
        "clicked": [True, False, True, False, False],
        "converted": [True, True, False, True, False],
    }
    with _raises("events.parquet: 2 rows have converted=true but clicked=false"):
        load_dataset(make_dataset(events=events))
    with _raises("(e.g. rows 1, 3)"):
        load_dataset(make_dataset(events=events))


def test_zero_exposures(make_dataset):
    empty = pa.table(
        {
            "user_id": pa.array([], pa.int64()),
            "item_id": pa.array([], pa.int64()),
            "timestamp": pa.array([], pa.int64()),
            "clicked": pa.array([], pa.bool_()),
            "converted": pa.array([], pa.bool_()),
        }
    )
    with _raises("events.parquet: no rows, so the exposure objective has no positives"):
        load_dataset(make_dataset(events=empty))


def test_zero_clicks(make_dataset):
    events = {"clicked": [False] * 5, "converted": [False] * 5}
    with _raises("events.parquet: column clicked is never true (5 rows), so the click objective"):
        load_dataset(make_dataset(events=events))


def test_zero_conversions(make_dataset):
    root = make_dataset(events={"converted": [False] * 5})
    with _raises("column converted is never true (5 rows), so the conversion objective"):
        load_dataset(root)
    # a cascade without conversions may say so
    assert load_dataset(root, objectives=("exposure", "click")).counts()["conversions"] == 0


def test_duplicate_item_ids(make_dataset):
    items = {"item_id": [10, 11, 12, 13, 12, 12], "topic": list("xyxzxx"), "tags": [[]] * 6}
    with _raises("items.parquet: 2 rows duplicate an earlier item_id (e.g. 12)"):
        load_dataset(make_dataset(items={**items, "title": list("ABCDEF")}))


def test_duplicate_user_ids(make_dataset):
    users = {"user_id": [1, 2, 3, 1], "segment": list("abab"), "age": [1.0, 2.0, 3.0, 4.0]}
    with _raises("users.parquet: 1 rows duplicate an earlier user_id (e.g. 1)"):
        load_dataset(make_dataset(users=users))


def test_spec_feature_column_missing(make_dataset):
    with _raises("items.parquet: missing feature column 'tags' (multi_hot) named in the feature"):
        load_dataset(make_dataset(items={"tags": None}), SPEC)
    load_dataset(make_dataset(items={"tags": None}))  # without a spec it is just a column


def test_spec_feature_column_of_wrong_kind(make_dataset):
    items = {"tags": ["p", "p q", "", "q"]}
    with _raises("items.parquet: column tags is multi_hot in the feature spec but has type string"):
        load_dataset(make_dataset(items=items), SPEC)


def test_candidates_load(make_dataset):
    ds = load_dataset(make_dataset(candidates={"request_id": [1, 4], "item_id": [11, 10]}))
    assert ds.candidates.num_rows == 2


def test_candidates_with_unknown_request(make_dataset):
    cand = {"request_id": [1, 8, 9], "item_id": [11, 10, 10]}
    with _raises("candidates.parquet: 2 rows have request_id not in events.parquet request_id"):
        load_dataset(make_dataset(candidates=cand))


def test_candidates_with_unknown_item(make_dataset):
    cand = {"request_id": [1, 2, 3], "item_id": [11, 77, 10]}
    with _raises("candidates.parquet: 1 rows have item_id not in items.parquet (e.g. 77)"):
        load_dataset(make_dataset(candidates=cand))


def test_candidates_need_request_ids_on_events(make_dataset):
    root = make_dataset(
        events={"request_id": None}, candidates={"request_id": [1], "item_id": [11]}
    )
    with _raises("candidates.parquet: present, but events.parquet has no request_id column"):
        load_dataset(root)


# --------------------------------------------------------------------------- publishing


def test_staged_dataset_replaces_old_entries_and_leaves_no_temp(make_dataset):
    root = make_dataset(parts=2, candidates={"request_id": [1], "item_id": [11]})
    (root / "notes.txt").write_text("mine")
    new = make_dataset()
    with staged_dataset(root) as tmp:
        for name in ("events.parquet", "users.parquet", "items.parquet"):
            (tmp / name).write_bytes((new / name).read_bytes())
        write_meta(tmp, {"name": "new"})
    assert sorted(p.name for p in root.iterdir()) == [
        "dataset.json",
        "events.parquet",
        "items.parquet",
        "notes.txt",
        "users.parquet",
    ]
    assert load_dataset(root).meta == {"name": "new"}


def test_failed_staging_publishes_nothing(make_dataset):
    root = make_dataset()
    write_meta(root, {"name": "old"})
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(RuntimeError, match="boom"), staged_dataset(root) as tmp:
        pq.write_table(pa.table({"x": [1]}), tmp / "events.parquet")
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


# --------------------------------------------------------------------------- split


def _events(users: list, timestamps: list) -> pa.Table:
    n = len(users)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(range(n), pa.int64()),
            "timestamp": pa.array(timestamps, pa.int64()),
            "clicked": pa.array([True] * n),
            "converted": pa.array([False] * n),
        }
    )


def _check_split(events: pa.Table, split) -> None:
    n = events.num_rows
    all_rows = np.concatenate([split.train, split.val, split.test])
    assert np.array_equal(np.sort(all_rows), np.arange(n)), "parts must partition the rows"
    users = events["user_id"].to_numpy()
    ts = events["timestamp"].to_numpy()
    key = np.stack([ts, np.arange(n)], axis=1)  # order within a user: (timestamp, row)
    for u in np.unique(users):
        parts = [rows[users[rows] == u] for rows in (split.train, split.val, split.test)]
        ordered = [sorted(map(tuple, key[p])) for p in parts]
        for earlier, later in ((0, 1), (1, 2), (0, 2)):
            if ordered[earlier] and ordered[later]:
                assert ordered[earlier][-1] < ordered[later][0], f"user {u}: order broken"


def test_split_orders_each_user_by_time():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 50, 3_000)
    ts = rng.integers(0, 10_000, 3_000)
    events = _events(users.tolist(), ts.tolist())
    split = split_by_time(events, val_frac=0.1, test_frac=0.2)
    _check_split(events, split)
    n = events.num_rows
    assert abs(len(split.test) / n - 0.2) < 0.02
    assert abs(len(split.val) / n - 0.1) < 0.02
    again = split_by_time(events, val_frac=0.1, test_frac=0.2)
    assert np.array_equal(split.train, again.train)
    assert np.array_equal(split.val, again.val)
    assert np.array_equal(split.test, again.test)


def test_split_small_users_are_all_train_and_ties_go_by_row():
    # user 1: 2 events (< min_events) → train; user 2: 5 events at one timestamp
    events = _events([1, 2, 2, 1, 2, 2, 2], [5, 9, 9, 1, 9, 9, 9])
    split = split_by_time(events, val_frac=0.2, test_frac=0.2, min_events=3)
    assert split.train.tolist() == [0, 1, 2, 3, 4]
    assert split.val.tolist() == [5]
    assert split.test.tolist() == [6]


def test_split_keeps_a_train_event_for_tiny_users():
    split = split_by_time(_events([1, 1, 1], [3, 2, 1]), val_frac=0.1, test_frac=0.2)
    assert (split.train.tolist(), split.val.tolist(), split.test.tolist()) == ([2], [1], [0])


def test_split_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="val_frac and test_frac"):
        split_by_time(_events([1], [1]), val_frac=0.5, test_frac=0.5)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20)), min_size=1, max_size=60),
    val=st.sampled_from([0.0, 0.1, 0.25]),
    test=st.sampled_from([0.0, 0.2, 0.5]),
    min_events=st.integers(1, 4),
)
def test_split_invariants_hold_for_any_events(rows, val, test, min_events):
    events = _events([u for u, _ in rows], [t for _, t in rows])
    split = split_by_time(events, val_frac=val, test_frac=test, min_events=min_events)
    _check_split(events, split)
    users = events["user_id"].to_numpy()
    for u, n in zip(*np.unique(users, return_counts=True), strict=True):
        if n >= min_events:
            assert np.isin(split.train, np.flatnonzero(users == u)).any(), "a train event kept"
        else:
            assert not np.isin(
                np.concatenate([split.val, split.test]), np.flatnonzero(users == u)
            ).any()
