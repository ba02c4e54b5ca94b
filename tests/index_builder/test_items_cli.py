"""`csmf index upsert / delete / compact` and `csmf items encode` as a user runs them: writes
land in the item log beside the bundle, bad rows are rejected by id, and compaction publishes a
verified bundle that answers exactly what the written bundle answers (flat) — or within its
recall, without tombstones (HNSW)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from csmf.bundle import load_bundle, read_manifest
from csmf.catalogue import Catalogue
from index_builder.build import build_bundle
from index_builder.config import BuildConfig


def csmf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csmf.cli", *map(str, args)], capture_output=True, text=True
    )


def _rows(bundle, n, prefix):
    items = pq.read_table(read_manifest(bundle).source["items"]).to_pylist()[:n]
    return [{**r, "item_id": f"{prefix}{i}"} for i, r in enumerate(items)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids_of(bundle, q, k=10):
    _, rows = bundle.search(q, k)
    return [[bundle.item_ids[r] for r in row if r >= 0] for row in rows]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_upsert_delete_compact_from_the_command_line(kind, flat_bundle, tiny_run, tmp_path):
    src = tmp_path / "b"
    if kind == "flat":
        shutil.copytree(flat_bundle, src)
    else:
        build_bundle(tiny_run, src, BuildConfig(index="hnsw", recall_floor=0.5), progress=False)
    new = _rows(src, 30, "new-")
    r = csmf("index", "upsert", src, _jsonl(tmp_path / "new.jsonl", new))
    assert r.returncode == 0, r.stderr
    assert "upserted 30 items (log record 1)" in r.stdout
    assert (tmp_path / "b.items.log").is_file()
    bad = [{"item_id": "x1", "colour": "red"}, {"item_id": 5}, new[0] | {"item_id": "ok-1"}]
    r = csmf("index", "upsert", src, _jsonl(tmp_path / "bad.jsonl", bad))
    assert r.returncode == 2
    assert "x1: unknown column 'colour'" in r.stderr and "items[1]" in r.stderr
    assert "upserted 1 items" in r.stdout
    gone = ["new-3", "new-4", "i0", "i1", "never-there"]
    (tmp_path / "gone.txt").write_text("\n".join(gone))
    r = csmf("index", "delete", src, tmp_path / "gone.txt")
    assert r.returncode == 0, r.stderr

    written = Catalogue(load_bundle(src))
    written.catch_up()
    wb = written.bundle
    live = written.live_rows()
    assert wb.item_rows["new-3"] not in set(live.tolist())
    q = np.random.default_rng(0).standard_normal((20, wb.dim)).astype(np.float32)
    want = _ids_of(wb, q)

    r = csmf("index", "compact", src, "--if-due", "--quiet")  # a few tombstones: not due
    assert r.returncode == 0 and "compaction not due" in r.stdout, r.stderr
    out = tmp_path / "compacted"
    if kind == "hnsw":  # the manifest states when tombstones make a compaction due
        mpath = src / "manifest.json"
        doc = json.loads(mpath.read_text())
        assert doc["index"]["tombstone_limit"] == 0.2
        doc["index"]["tombstone_limit"] = 0.001
        mpath.write_text(json.dumps(doc))
    due = ["--if-due"] if kind == "hnsw" else []
    r = csmf("index", "compact", src, "--out", out, "--quiet", *due)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["records_folded"] == 3 and summary["items"] == len(live)
    m = read_manifest(out)
    assert m.item_count == len(live) and m.items_log.applied_seq == 3
    cb = load_bundle(out)
    assert not set(gone) & set(cb.item_ids.tolist())
    assert cb.index.stats().get("deleted") is None  # nothing left to filter
    again = Catalogue(cb)
    assert again.catch_up() == 0  # the log is folded in: nothing to replay
    got = _ids_of(cb, q)
    if kind == "flat":
        assert got == want
    else:
        overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want, strict=True)])
        assert overlap >= 0.9
    # a later write to the shared log reaches the compacted bundle only
    r = csmf("index", "delete", out, _jsonl(tmp_path / "g2.jsonl", [{"item_id": "new-5"}]))
    assert r.returncode == 0, r.stderr
    c2 = Catalogue(load_bundle(out))
    assert c2.catch_up() == 1 and c2.bundle.dead[c2.bundle.item_rows["new-5"]]


def test_items_encode_writes_the_vectors_of_item_rows(flat_bundle, tmp_path):
    rows = _rows(flat_bundle, 5, "cold-") + [{"item_id": "bad", "price": "cheap"}]
    out = tmp_path / "v.parquet"
    r = csmf("items", "encode", flat_bundle, _jsonl(tmp_path / "rows.jsonl", rows), "--out", out)
    assert r.returncode == 2 and "bad: 'price' must be a number" in r.stderr
    t = pq.read_table(out).to_pydict()
    assert t["item_id"] == [f"cold-{i}" for i in range(5)]
    want = load_bundle(flat_bundle).item_encoder.encode(rows[:5])
    np.testing.assert_allclose(np.array(t["vector"]), want, rtol=1e-5)
    assert not (flat_bundle.parent / f"{flat_bundle.name}.items.log").exists()  # no write
