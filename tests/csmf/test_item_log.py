"""The write-ahead item log: records round-trip, appends from several processes get one sequence
without gaps, a torn tail (a crash mid-append) is dropped by the next writer, corruption is an
error naming the record."""

from __future__ import annotations

import multiprocessing as mp
import struct

import numpy as np
import pytest

from csmf.item_log import HEADER, MAGIC, ItemLog, ItemLogError, encode_payload


def _upsert(n: int, seed: int = 0, d: int = 4) -> bytes:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    ids = [f"x{seed}-{i}" for i in range(n)]
    return encode_payload("upsert", ids, v, {"genre": ["a"] * n, "price": [1.5] * n})


def test_records_round_trip(tmp_path):
    log = ItemLog(tmp_path / "b.items.log")
    assert list(log.read()) == []
    a = log.append(_upsert(3))
    b = log.append(encode_payload("delete", ["x0-1", "gone"]))
    assert (a.seq, b.seq) == (1, 2) and a.offset == len(MAGIC) and b.offset == a.end
    got = list(log.read())
    assert [r.seq for r in got] == [1, 2]
    assert got[0].ids == ["x0-0", "x0-1", "x0-2"] and got[0].columns["price"] == [1.5] * 3
    np.testing.assert_array_equal(
        got[0].vectors, np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    )
    assert got[1].op == "delete" and got[1].vectors is None
    assert [r.seq for r in log.read(a.end, 1)] == [2]  # resume from a known boundary


def _append_many(path, worker: int, count: int) -> None:
    log = ItemLog(path)
    for i in range(count):
        log.append(_upsert(2, seed=worker * 1000 + i))


def test_appends_from_several_processes_form_one_sequence(tmp_path):
    path = tmp_path / "shared.items.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    recs = list(ItemLog(path).read())
    assert [r.seq for r in recs] == list(range(1, 46))
    assert len({r.ids[0] for r in recs}) == 45  # every append is there, once


def test_a_torn_tail_is_dropped_by_the_next_writer(tmp_path):
    path = tmp_path / "t.items.log"
    log = ItemLog(path)
    first = log.append(_upsert(2))
    whole = path.read_bytes()
    log.append(_upsert(5, seed=1))
    for cut in (3, HEADER.size + 7):  # inside the header, inside the payload
        path.write_bytes(path.read_bytes()[: first.end + cut])
        assert [r.seq for r in log.read()] == [1]  # readers stop before the torn record
        again = log.append(_upsert(1, seed=2))
        assert again.seq == 2 and again.offset == first.end
        assert [r.seq for r in log.read()] == [1, 2]
        path.write_bytes(whole)  # back to one record for the next cut
        log.append(_upsert(5, seed=1))


def test_a_bad_checksum_names_the_record(tmp_path):
    path = tmp_path / "c.items.log"
    log = ItemLog(path)
    log.append(_upsert(2))
    second = log.append(_upsert(2, seed=1))
    log.append(_upsert(2, seed=2))
    data = bytearray(path.read_bytes())
    data[second.offset + HEADER.size + 10] ^= 0x40  # one bit in record 2's payload
    path.write_bytes(bytes(data))
    with pytest.raises(ItemLogError, match=f"record 2 at byte {second.offset}: checksum mismatch"):
        list(log.read())
    with pytest.raises(ItemLogError, match="record 2"):
        log.append(_upsert(1, seed=3))  # nothing is appended after corruption
    data[second.offset + HEADER.size + 10] ^= 0x40
    struct.pack_into("<4s", data, second.offset, b"XXXX")
    path.write_bytes(bytes(data))
    with pytest.raises(ItemLogError, match=f"bad record header at byte {second.offset}"):
        list(log.read())


def test_not_a_log(tmp_path):
    path = tmp_path / "x.items.log"
    path.write_bytes(b"PAR1 something else entirely")
    with pytest.raises(ItemLogError, match="not an item log"):
        list(ItemLog(path).read())
