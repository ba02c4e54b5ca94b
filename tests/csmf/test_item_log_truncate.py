"""Truncating the item log (records folded into a compacted bundle): later records are kept byte
for byte and the sequence goes on; readers and appenders holding positions in the replaced file
follow the new one; appends racing truncations lose nothing; a reader that needs a dropped
record gets an error saying so; a truncation SIGKILLed at any point leaves a valid log holding
every record after the folded seq."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from csmf.item_log import MAGIC2, ItemLog, ItemLogError, encode_payload


def _upsert(tag: str, n: int = 2, d: int = 4) -> bytes:
    v = np.full((n, d), float(len(tag)), np.float32)
    return encode_payload("upsert", [f"{tag}-{i}" for i in range(n)], v, {"genre": ["a"] * n})


def _fill(log: ItemLog, count: int) -> list:
    return [log.append(_upsert(f"r{i + 1}")) for i in range(count)]


def test_truncation_keeps_later_records_and_the_sequence_goes_on(tmp_path):
    log = ItemLog(tmp_path / "b.items.log")
    recs = _fill(log, 5)
    tail = log.path.read_bytes()[recs[3].offset :]
    done = log.truncate(3)
    assert done == {"base": 3, "records_dropped": 3, "bytes_before": recs[-1].end,
                    "bytes_after": len(MAGIC2) + 12 + len(tail)}  # fmt: skip
    data = log.path.read_bytes()
    assert data.startswith(MAGIC2) and data.endswith(tail)  # records 4 and 5 byte for byte
    assert log.base() == 3
    assert [(r.seq, r.ids[0]) for r in log.read(0, 3)] == [(4, "r4-0"), (5, "r5-0")]
    with pytest.raises(ItemLogError, match=r"records 3\.\.3 were folded into a compacted bundle"):
        list(log.read(0, 2))  # a bundle that holds only up to 2 cannot be served from this log
    assert log.append(_upsert("r6")).seq == 6
    assert log.truncate(3) is None and log.truncate(2) is None  # already done
    with pytest.raises(
        ItemLogError, match="cannot drop the records up to 9, the log ends at record 6"
    ):
        log.truncate(9)
    log.truncate(6)  # everything folded: a header and no record
    assert list(log.read(0, 6)) == [] and log.last() == (len(MAGIC2) + 12, 6, None)
    assert log.append(_upsert("r7")).seq == 7
    assert [r.seq for r in log.read(0, 6)] == [7]


def test_positions_in_the_replaced_file_are_followed(tmp_path):
    log = ItemLog(tmp_path / "b.items.log")
    recs = _fill(log, 4)
    at = recs[2]  # a reader that applied record 3, and its position in the old file
    log.truncate(2)
    log.append(_upsert("r5"))
    got = list(log.read(at.end, at.seq, at.ino))  # another inode: rescanned by seq
    assert [r.seq for r in got] == [4, 5] and got[0].ino != at.ino
    rec = log.append(_upsert("r6"), (at.end, at.seq, at.ino))  # a stale hint
    assert rec.seq == 6 and [r.seq for r in log.read(0, 2)] == [3, 4, 5, 6]


def _append_many(path, worker: int, count: int, out) -> None:
    log = ItemLog(path)
    for i in range(count):
        rec = log.append(_upsert(f"w{worker}x{i}"))
        out.put((rec.seq, rec.ids[0]))


def test_appends_racing_truncations_lose_nothing(tmp_path):
    path = tmp_path / "race.items.log"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_append_many, args=(path, w, 30, out)) for w in range(3)]
    for p in procs:
        p.start()
    log, acked, cuts = ItemLog(path), {}, 0
    while len(acked) < 90:
        seq, first = out.get(timeout=60)
        acked[seq] = first
        if seq % 7 == 0 and log.truncate(seq - 3) is not None:  # while the others append
            cuts += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert sorted(acked) == list(range(1, 91)) and cuts > 3
    base = log.base()
    kept = {r.seq: r.ids[0] for r in log.read(0, base)}
    assert kept == {s: acked[s] for s in range(base + 1, 91)}  # every later append, once


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import csmf.atomic, csmf.item_log
    from csmf.item_log import ItemLog

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    path, phase, upto = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if phase == "copy":  # half of the kept records written to the temporary file
        csmf.item_log.CHUNK, pread, calls = 200, os.pread, [0]
        def halfway(*a):
            calls[0] += 1
            if calls[0] == 3:
                die()
            return pread(*a)
        os.pread = halfway
    elif phase == "rename":  # the temporary file complete and fsynced, not renamed
        os.replace = die
    elif phase == "folder":  # renamed, the folder not fsynced yet
        csmf.atomic.fsync_path = die
    ItemLog(path).truncate(upto)
    """
)


@pytest.mark.parametrize("phase", ["copy", "rename", "folder"])
def test_a_truncation_killed_at_any_point_leaves_a_valid_log(phase, tmp_path):
    log = ItemLog(tmp_path / "k.items.log")
    recs = _fill(log, 12)
    want = {r.seq: r.ids[0] for r in recs if r.seq > 4}
    p = subprocess.run([sys.executable, "-c", CHILD, str(log.path), phase, "4"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    strays = list(tmp_path.glob(".k.items.log.*.tmp"))
    assert len(strays) == (0 if phase == "folder" else 1)
    base = log.base()
    assert base == (4 if phase == "folder" else 0)  # the old log (a superset) or the new one
    assert {r.seq: r.ids[0] for r in log.read(0, 4)} == want  # nothing acknowledged lost
    assert log.append(_upsert("r13")).seq == 13  # the sequence goes on, no repeat
    again = log.truncate(4)
    assert (again is None) == (base == 4)  # the retry truncates the old log, not the new one
    assert log.base() == 4 and not list(tmp_path.glob("*.tmp"))  # and removes the stray
    assert [r.seq for r in log.read(0, 4)] == list(range(5, 14))
