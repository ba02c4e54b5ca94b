"""Item writes through the admin API on every FAISS index type: written items (cold ones encoded
from their features, others with given vectors, replacements of existing items) are served with
exact weighted scores; filters, `exclude` and `exclude_seen` hold for them item for item (flat,
IVF probing every list) or within recall (HNSW); deleted items never come back; bad items get
errors by id while the good ones are written; a restarted service replays the log."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures.services import AUTH

from csmf.bundle import load_bundle, read_manifest
from csmf.catalogue import Catalogue

KINDS = ("flat", "ivf", "hnsw")
WEIGHTS = {"exposure": 0.5, "click": 2.0, "conversion": 1.5}
FILTER = {"field": "genre", "in": ["drama", "comedy"]}


def _copy(bundles, kind, tmp_path):
    out = tmp_path / kind
    shutil.copytree(bundles[kind], out)
    return out


def _source_rows(bundle_path, n):
    return pq.read_table(read_manifest(bundle_path).source["items"]).to_pylist()[:n]


def _reference(path):
    cat = Catalogue(load_bundle(path))
    cat.catch_up()
    return cat.bundle


def _truth(b, user, history, excluded=(), allowed=None, k=25):
    snap = b.users.get(user)
    row = snap[0] if snap else {}
    e = b.encoder.encode([row], [history])[0]
    n = len(b.item_ids)
    live = ~b.dead
    v = np.zeros((n, b.dim), np.float32)
    v[live] = b.index.vectors(np.flatnonzero(live))
    scale = b.scale(WEIGHTS)
    fused = v @ (e * scale)
    ok = live.copy()
    if allowed is not None:
        ok &= allowed
    ok[list(excluded)] = False
    fused[~ok] = -np.inf
    order = np.argsort(-fused, kind="stable")[:k]
    return [int(r) for r in order if np.isfinite(fused[r])], fused


def _write(client, bundle_path, b0):
    """Cold items from features, items with vectors aimed at user 3, replacements, deletes."""
    rows = _source_rows(bundle_path, 30)
    cold = [{**r, "item_id": f"cold-{i}", "genre": "drama"} for i, r in enumerate(rows[:10])]
    user = b0.users.ids[3]
    row, hist = b0.users.get(user)
    e = b0.encoder.encode([row], [hist])[0] * b0.scale(WEIGHTS)
    rng = np.random.default_rng(0)
    aimed = [
        {"item_id": f"aimed-{i}", "genre": g, "price": 5.0, "title": f"Aimed {i}",
         "vector": (e / np.linalg.norm(e) * (3 + i) + rng.normal(0, 0.1, b0.dim)).tolist()}
        for i, g in enumerate(["drama", "comedy", "action", "drama", "docu"])
    ]  # fmt: skip
    replaced = [{**r, "genre": "comedy"} for r in rows[10:13]]
    r = client.put("/admin/items", json={"items": cold + aimed + replaced}, headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["seq"] == 1 and len(doc["written"]) == 18 and doc["errors"] == []
    gone = [rows[20]["item_id"], rows[21]["item_id"], "cold-0", "aimed-4", "never-there"]
    r = client.request("DELETE", "/admin/items", json={"ids": gone}, headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["seq"] == 2 and sorted(doc["absent"]) == ["never-there"]
    return user, hist, gone


@pytest.mark.parametrize("kind", KINDS)
def test_written_items_are_served_exactly(kind, bundles, make_client, tmp_path):
    path = _copy(bundles, kind, tmp_path)
    client = make_client(path)
    user, hist, gone = _write(client, path, load_bundle(path))
    b = _reference(path)
    rows = b.item_rows
    assert {"cold-3", "aimed-2"} <= set(rows) and b.dead[rows["cold-0"]]

    # plain weighted search: the aimed items lead, the deleted one is gone
    r = client.post("/v1/retrieve", json={"user_id": user, "k": 25, "weights": WEIGHTS,
                                          "exclude_seen": False})  # fmt: skip
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    got = [rows[i["item_id"]] for i in items]
    want, fused = _truth(b, user, hist)
    assert [i["item_id"] for i in items[:4]] == ["aimed-3", "aimed-2", "aimed-1", "aimed-0"]
    assert items[0]["meta"]["title"] == "Aimed 3"
    np.testing.assert_allclose([i["score"] for i in items], fused[got], rtol=1e-4, atol=1e-4)
    if kind != "hnsw":
        assert got == want

    # filter + exclude + exclude_seen with an inline history of written items
    allowed = np.array(
        [g in ("drama", "comedy") for g in b.attributes.values("genre", np.arange(len(rows)))]
    )
    history = ["aimed-3", "cold-5", *list(hist)[-3:]]
    body = {"user_id": user, "history": history, "k": 25, "weights": WEIGHTS,
            "exclude": ["aimed-1", "cold-2"], "exclude_seen": True, "filter": FILTER}  # fmt: skip
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    got = [rows[i["item_id"]] for i in r.json()["items"]]
    excluded = {rows[i] for i in ["aimed-1", "cold-2", *history] if i in rows}
    want, _ = _truth(b, user, history, excluded, allowed)
    assert allowed[got].all() and not set(got) & excluded
    assert not set(got) & set(np.flatnonzero(b.dead).tolist())
    if kind == "hnsw":
        assert len(set(got) & set(want)) >= 0.8 * len(want)
    else:
        assert got == want
    ids = [i["item_id"] for i in r.json()["items"]]
    assert "aimed-0" in ids and "aimed-2" not in ids  # action: outside the filter

    # every live item, none deleted
    r = client.post("/v1/retrieve", json={"user_id": user, "k": 200, "exclude_seen": False})
    ids = {i["item_id"] for i in r.json()["items"]}
    assert not ids & set(gone)
    info = client.get("/admin/bundle", headers=AUTH).json()
    assert info["item_log"]["applied_seq"] == 2 and info["item_log"]["deleted"] == 4


def test_a_restarted_service_replays_the_log(bundles, make_client, tmp_path):
    path = _copy(bundles, "flat", tmp_path)
    first = make_client(path)
    user, hist, gone = _write(first, path, load_bundle(path))
    body = {"user_id": user, "k": 30, "weights": WEIGHTS}
    before = first.post("/v1/retrieve", json=body).json()["items"]
    again = make_client(path)  # a new process would do the same: load + replay
    after = again.post("/v1/retrieve", json=body).json()["items"]
    assert [i["item_id"] for i in after] == [i["item_id"] for i in before]
    assert after[0]["item_id"] == "aimed-3"


def test_bad_items_get_errors_by_id(bundles, make_client, tmp_path):
    path = _copy(bundles, "flat", tmp_path)
    client = make_client(path, max_item_batch=5)
    d = load_bundle(path).dim
    items = [
        {"item_id": "good", "genre": "drama", "price": 1.0},
        {"item_id": "u1", "colour": "red"},
        {"item_id": "u2", "vector": [0.0] * (d + 1)},
        {"item_id": "u3", "price": "NaN"},
        {"item_id": 7},
    ]
    r = client.put("/admin/items", json={"items": items}, headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["written"] == ["good"]
    errors = {e["item_id"]: e["error"] for e in doc["errors"]}
    assert "unknown column 'colour'" in errors["u1"]
    assert f"must have {d} values" in errors["u2"]
    assert "'price' must be a number" in errors["u3"]
    assert "non-empty string, got 7" in errors["items[4]"]
    r = client.put("/admin/items", json={"items": items + items[:1]}, headers=AUTH)
    assert r.status_code == 413 and "at most 5 items" in r.text
    r = client.put("/admin/items", json={"items": "nope"}, headers=AUTH)
    assert r.status_code == 422
    r = client.put("/admin/items", json={"items": items})
    assert r.status_code == 401
    r = client.request("DELETE", "/v1/admin/items", json={"ids": ["good", 3]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["written"] == ["good"]
    assert r.json()["errors"][0]["item_id"] == "ids[1]"
    r = client.post("/v1/retrieve", json={"user_id": "u1", "k": 200, "exclude_seen": False})
    assert "good" not in {i["item_id"] for i in r.json()["items"]}


def test_a_corrupt_item_log_is_named_at_start_and_on_reload(bundles, make_client, tmp_path):
    from csmf.item_log import HEADER, ItemLog, encode_payload

    path = _copy(bundles, "flat", tmp_path)
    log = ItemLog(path.parent / f"{path.name}.items.log")
    log.append(encode_payload("delete", ["i1"]))
    second = log.append(encode_payload("delete", ["i2"]))
    data = bytearray(log.path.read_bytes())
    data[second.offset + HEADER.size + 5] ^= 0x01
    log.path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=f"record 2 at byte {second.offset}: checksum mismatch"):
        make_client(path)  # the service refuses to start on it rather than serve a wrong catalogue
    client = make_client(bundles["flat"])
    r = client.post("/admin/reload", json={"bundle": str(path)}, headers=AUTH)
    assert r.status_code == 422 and "record 2" in r.json()["detail"], r.text
    assert r.json()["serving"]  # the old bundle keeps serving


def test_a_lone_service_truncates_the_log_after_compaction(bundles, make_client, tmp_path):
    from fixtures.waiting import PATIENCE, wait_until

    from csmf.item_log import ItemLog
    from index_builder.compact import compact_bundle

    path = _copy(bundles, "flat", tmp_path)
    log = ItemLog(path.parent / f"{path.name}.items.log")
    client = make_client(path, truncate_item_log=True)
    user, hist, gone = _write(client, path, load_bundle(path))
    body = {"user_id": user, "k": 30, "weights": WEIGHTS}
    before = client.post("/v1/retrieve", json=body).json()["items"]
    assert log.base() == 0  # nothing folded yet: the log is the only record of the writes
    compact_bundle(path, path)
    assert client.post("/admin/reload", json={"bundle": str(path)}, headers=AUTH).status_code == 200
    wait_until(lambda: log.base() == 2, PATIENCE, "records 1-2 dropped (no replica to wait for)")
    info = client.get("/admin/bundle", headers=AUTH).json()["item_log"]
    assert (info["folded_seq"], info["log_base"], info["applied_seq"]) == (2, 2, 2)
    after = client.post("/v1/retrieve", json=body).json()["items"]
    assert [i["item_id"] for i in after] == [i["item_id"] for i in before]
    r = client.request("DELETE", "/admin/items", json={"ids": ["aimed-3"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["seq"] == 3  # the sequence goes on
    again = make_client(path)  # a restart: the compacted bundle, then record 3 alone
    ids = [i["item_id"] for i in again.post("/v1/retrieve", json=body).json()["items"]]
    assert ids[0] == "aimed-2" and not set(ids) & set(gone)
