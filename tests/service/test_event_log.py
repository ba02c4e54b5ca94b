"""The event log's crash recovery without a server: spools of dead writers replayed into the part
they would have become (once), leftover ``.tmp`` files swept, a live writer's files left alone,
a cut last line skipped, a clean stop leaving no spool behind, and a folder that is a file refused
with one line. The real ``kill -9`` of a serving worker is tests/reliability/test_event_log_crash.py.
"""

from __future__ import annotations

import fcntl
import json
import time

import pyarrow.parquet as pq
import pytest

from service.event_log import EventLog, EventLogError


def _rows(folder):
    parts = sorted((folder / "events").glob("part-*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def _line(entry) -> bytes:
    return json.dumps(entry).encode() + b"\n"


def test_clean_stop_writes_everything_and_leaves_no_spool(tmp_path):
    log = EventLog(tmp_path, rotate_s=3600, sync_s=0)
    log.start()
    log.served(7, "u1", ["a", "b"])
    log.served(8, None, ["c"], cold=True)  # history-only: user null, marked cold
    log.feedback(7, "u1", "b", "conversion")
    log.stop()
    rows = _rows(tmp_path)
    assert [(r["user_id"], r["item_id"], r["clicked"], r["converted"], r["cold_start"])
            for r in rows] == [
        ("u1", "a", False, False, False), ("u1", "b", False, False, False),
        (None, "c", False, False, True), ("u1", "b", True, True, False),
    ]  # fmt: skip
    assert not list((tmp_path / "spool").iterdir())


def test_entries_reach_the_spool_within_sync_s(tmp_path):
    log = EventLog(tmp_path, rotate_s=3600, sync_s=0.05)
    log.start()
    try:
        log.served(1, "u1", ["a", "b", "c"])
        (spool,) = (tmp_path / "spool").glob("*.jsonl")
        deadline = time.monotonic() + 5
        while b'"a"' not in spool.read_bytes():
            assert time.monotonic() < deadline, "entry never reached the spool"
            time.sleep(0.01)
    finally:
        log.stop()


def test_dead_writers_spools_are_replayed_once_and_tmp_swept(tmp_path):
    spool, events = tmp_path / "spool", tmp_path / "events"
    spool.mkdir()
    events.mkdir()
    # a dead writer (no lock held): two whole entries and a last line cut by the crash
    (spool / "111-abc-000003.jsonl").write_bytes(
        _line(["s", 5, "u1", 1000, ["a", "b"], False])
        + _line(["f", 5, "u1", 1001, "a", "click", False])
        + b'["s", 6, "u2", 10'
    )
    # a dead writer whose part was renamed before its spool was removed: nothing twice
    (spool / "222-def-000001.jsonl").write_bytes(_line(["s", 9, "u3", 1, ["z"], False]))
    pq.write_table(
        pq.read_table(_one_part(tmp_path / "seed")),
        events / "part-20250101T000000.0Z-222-def-000001.parquet",
    )
    dead_tmp = events / ".part-20250101T000000.0Z-111-abc-000002.parquet.111.aa.tmp"
    dead_tmp.write_bytes(b"half")
    # a live writer (holds its spool's lock): its spool and .tmp are left alone
    live = spool / "333-fed-000001.jsonl"
    live.write_bytes(_line(["s", 1, "u9", 1, ["q"], False]))
    live_tmp = events / ".part-20250101T000000.0Z-333-fed-000001.parquet.333.bb.tmp"
    live_tmp.write_bytes(b"busy")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        log = EventLog(tmp_path, rotate_s=3600)
        log.start()
        log.stop()
    assert log.recovered == {"spools": 2, "rows": 3, "tmp_removed": 1}
    assert not dead_tmp.exists() and live_tmp.exists() and live.exists()
    rows = [(r["request_id"], r["item_id"], r["clicked"]) for r in _rows(tmp_path)]
    assert sorted(rows) == [(5, "a", False), (5, "a", True), (5, "b", False), (9, "z", False)]
    assert not (spool / "111-abc-000003.jsonl").exists()
    assert not (spool / "222-def-000001.jsonl").exists()


def _one_part(folder):
    log = EventLog(folder, rotate_s=3600)
    log.start()
    log.served(9, "u3", ["z"])
    log.stop()
    return log.parts[0]


def test_a_folder_that_is_a_file_is_one_clear_error(tmp_path):
    f = tmp_path / "log"
    f.write_text("not a folder")
    with pytest.raises(EventLogError, match=r"exists and is not a folder"):
        EventLog(f).start()
