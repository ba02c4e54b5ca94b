"""csmf.atomic: a file is replaced whole or not at all, and a failed write leaves no trace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from csmf.atomic import atomic_write, atomic_write_text, write_json


def test_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "doc.json"  # the folder is created
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1.5]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["doc.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it


def test_crash_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "scenarios.json"
    atomic_write_text(path, "old content")

    def crash(fh):
        fh.write(b"half of the new cont")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, crash)
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["scenarios.json"]

    with pytest.raises(KeyboardInterrupt):  # not only Exceptions: an interrupt cleans up too
        atomic_write(path, lambda fh: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert [p.name for p in tmp_path.iterdir()] == ["scenarios.json"]


def test_no_file_is_created_when_the_first_write_fails(tmp_path):
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "new.bin", lambda fh: int("x"))
    assert list(tmp_path.iterdir()) == []


def test_fsync_tree_reaches_every_file_and_folder(tmp_path, monkeypatch):
    import csmf.atomic as atomic

    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "part-0.parquet").write_bytes(b"x")
    (tmp_path / "dataset.json").write_text("{}")
    synced = []
    monkeypatch.setattr(atomic, "fsync_path", lambda p: synced.append(Path(p)))
    atomic.fsync_tree(tmp_path)
    assert synced.index(tmp_path / "events" / "part-0.parquet") < synced.index(tmp_path / "events")
    assert set(synced) == {tmp_path, tmp_path / "events", tmp_path / "dataset.json",
                           tmp_path / "events" / "part-0.parquet"}  # fmt: skip
    assert synced[-1] == tmp_path
