"""Weight and feature stores against their real backends: the scenarios file shared by several
workers, and Redis (shared test server under a unique prefix; a test-owned one to kill)."""

from __future__ import annotations

import json
import time

import pytest
from fixtures.services import REDIS_URL, wait_until

from service.feature_store import RedisFeatureStore, write_user
from service.weight_store import FileWeightStore, RedisWeightStore

OBJ = ("exposure", "click", "conversion")


def _stop_all(*stores):
    for s in stores:
        s.stop()


def test_file_store_shared_by_workers(tmp_path):
    path = tmp_path / "s.json"
    a, b = FileWeightStore(path, OBJ, 0.05), FileWeightStore(path, OBJ, 0.05)
    a.start(), b.start()
    try:
        assert a.wait_synced(2) and b.wait_synced(2)
        a.put("x", {"exposure": 1.0, "click": 0.0, "conversion": 2.0}, "")
        wait_until(lambda: "x" in b.scenarios, 1.0, "worker b to see worker a's write")
        b.put("x", {"exposure": 3.0, "click": 0.0, "conversion": 2.0}, "v2")
        wait_until(lambda: a.get("x").version == 2, 1.0, "worker a to see v2")
        assert a.get("x").weights["exposure"] == 3.0
        b.delete("x")
        wait_until(lambda: "x" not in a.scenarios, 1.0, "the delete")
        doc = json.loads(path.read_text())
        assert set(doc["scenarios"]) == {"default"} and doc["generation"] == 4
    finally:
        _stop_all(a, b)


def test_file_store_keeps_serving_when_the_file_breaks(tmp_path):
    path = tmp_path / "s.json"
    s = FileWeightStore(path, OBJ, 0.05)
    s.start()
    try:
        assert s.wait_synced(2)
        s.put("x", {"exposure": 1.0}, "")
        path.write_text("{ broken")
        wait_until(lambda: not s.health.up, 1.0, "degraded")
        assert "x" in s.scenarios and "JSONDecodeError" in s.health.error
        path.unlink()  # a missing file is rewritten from the last known state
        wait_until(lambda: s.health.up, 1.0, "recovery")
        assert "x" in json.loads(path.read_text())["scenarios"]
    finally:
        s.stop()


def test_redis_store_change_visible_everywhere_within_a_second(redis_prefix):
    a = RedisWeightStore(REDIS_URL, redis_prefix, OBJ, 0.25, 0.5)
    b = RedisWeightStore(REDIS_URL, redis_prefix, OBJ, 0.25, 0.5)
    a.start(), b.start()
    try:
        assert a.wait_synced(2) and b.wait_synced(2)
        assert a.get("default").version == 1 == b.get("default").version  # seeded once
        last = 0
        for i in range(3):
            t0 = time.monotonic()
            s = a.put("promo", {"exposure": float(i), "click": 1.0, "conversion": 0.0}, "")
            assert s.version > last  # versions only grow (ms of Redis's clock, or +1)
            last = s.version
            assert a.get("promo").version == s.version  # read-your-writes in the writer
            wait_until(
                lambda v=s.version: b.scenarios.get("promo") and b.get("promo").version == v,
                1.0,
                "b",
            )
            assert time.monotonic() - t0 < 1.0
        a.delete("promo")
        wait_until(lambda: "promo" not in b.scenarios, 1.0, "delete on b")
    finally:
        _stop_all(a, b)


def test_redis_store_down_keeps_last_known_then_catches_up(redis_server):
    prefix = "csmf-t:"
    s = RedisWeightStore(redis_server.url, prefix, OBJ, 0.1, 0.3)
    s.start()
    try:
        assert s.wait_synced(2)
        s.put("kept", {"exposure": 1.0, "click": 2.0, "conversion": 3.0}, "")
        redis_server.stop()
        wait_until(lambda: not s.health.up, 2.0, "degraded")
        assert s.get("kept").weights["click"] == 2.0  # the request path still has it
        from service.errors import StoreUnavailableError

        with pytest.raises(StoreUnavailableError, match="unavailable"):
            s.put("new", {"click": 1.0}, "")
        redis_server.start()  # same port, empty (no persistence)
        wait_until(lambda: s.health.up, 3.0, "reconnect")
        # Redis came back empty: the last known scenarios were written back
        import redis

        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        assert set(r.hkeys(prefix + "scenarios")) == {"default", "kept"}
        other = RedisWeightStore(redis_server.url, prefix, OBJ, 0.1, 0.3)
        other.start()
        assert other.wait_synced(2) and other.get("kept").weights["conversion"] == 3.0
        other.put("kept", {"exposure": 9.0, "click": 2.0, "conversion": 3.0}, "")
        wait_until(lambda: s.get("kept").weights["exposure"] == 9.0, 1.0, "catch up")
        other.stop()
        r.close()
    finally:
        s.stop()


def test_redis_feature_store_overlays_the_snapshot(redis_prefix):
    import redis

    snapshot = {"u1": ({"user_id": "u1", "age": 30}, ["i1"])}

    class Snap:
        def get(self, uid):
            return snapshot.get(uid)

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    write_user(client, redis_prefix, "u2", {"age": 40}, ["i9"])  # before start: the full read
    fs = RedisFeatureStore(REDIS_URL, redis_prefix, 0.1, 0.5)
    fs.start()
    try:
        wait_until(lambda: fs.health.up, 2.0, "sync")
        assert fs.lookup(Snap(), "u1") == ({"user_id": "u1", "age": 30}, ["i1"])
        assert fs.lookup(Snap(), "u2") == ({"age": 40}, ["i9"])
        write_user(client, redis_prefix, "u1", {"age": 31}, ["i1", "i2"])  # after: the stream
        wait_until(
            lambda: fs.lookup(Snap(), "u1") == ({"age": 31}, ["i1", "i2"]), 1.0, "live update"
        )
        client.hdel(redis_prefix + "users", "u1")
        client.xadd(redis_prefix + "users:changes", {"user_id": "u1"})
        wait_until(lambda: fs.lookup(Snap(), "u1")[0]["age"] == 30, 1.0, "back to the snapshot")
    finally:
        fs.stop()
        client.close()


def test_app_reads_live_features_from_redis(bundles, make_client, redis_prefix):
    """feature_store=redis: a user the pipeline publishes is served from the mirror (not cold)."""
    import redis

    client = make_client(
        bundles["flat"], redis_url=REDIS_URL, redis_prefix=redis_prefix, feature_store="redis"
    )
    assert client.get("/readyz").json()["feature_store"]["backend"] == "redis"
    body = {"user_id": "live-1", "k": 5, "weights": [1, 1, 1]}
    assert client.post("/v1/retrieve", json=body).json()["cold_start"] is True
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    write_user(r, redis_prefix, "live-1", {"gender": "F"}, ["i1", "i2", "i3"])
    r.close()
    wait_until(
        lambda: client.post("/v1/retrieve", json=body).json()["cold_start"] is False, 1.0, "mirror"
    )
    bundle = client.app.state.csmf.bundle.retriever.bundle
    e = bundle.encoder.encode([{"user_id": "live-1", "gender": "F"}], [["i1", "i2", "i3"]])
    _, rows = bundle.search(e * bundle.scale([1, 1, 1]), 5)
    live = client.post("/v1/retrieve", json=body).json()
    assert [i["item_id"] for i in live["items"]] == bundle.item_ids[rows[0]].tolist()


def test_absurd_live_feature_values_never_make_scores_infinite(bundles, make_client, redis_prefix):
    """A live numeric feature of 1e308 used to overflow float32 in the user vector, so every
    score became inf/NaN (and the JSON carried Infinity). Standardised inputs are clipped."""
    import math

    import redis

    client = make_client(
        bundles["flat"], redis_url=REDIS_URL, redis_prefix=redis_prefix, feature_store="redis"
    )
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    write_user(r, redis_prefix, "huge", {"age": 1e308, "gender": "F"}, ["i1", "i2"])
    r.close()
    body = {"user_id": "huge", "k": 5, "weights": [1, 1, 1], "explain": True}
    wait_until(
        lambda: client.post("/v1/retrieve", json=body).json()["cold_start"] is False, 1.0, "mirror"
    )
    for path, req in (
        ("/v1/retrieve", body),
        ("/v1/retrieve/batch", {"users": [{"user_id": "huge"}], "k": 5}),
    ):
        resp = client.post(path, json=req)
        assert resp.status_code == 200 and "Infinity" not in resp.text and "NaN" not in resp.text
        out = resp.json()
        items = out["items"] if "items" in out else out["results"][0]["items"]
        assert len(items) == 5 and all(math.isfinite(i["score"]) for i in items)


def test_redis_store_skips_an_unreadable_document_and_can_delete_it(redis_prefix):
    """A scenario written into Redis by hand as garbage is ignored by every sync (with a
    warning), not fatal to it, and an admin DELETE of it still works."""
    import redis

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    r.hset(redis_prefix + "scenarios", mapping={"junk": "{not json", "odd": "[1, 2]"})
    s = RedisWeightStore(REDIS_URL, redis_prefix, OBJ, 0.05, 0.5)
    s.start()
    try:
        assert s.wait_synced(2)
        s.put("good", {"exposure": 1.0, "click": 1.0, "conversion": 1.0}, "")
        assert set(s.scenarios) == {"default", "good"}
        s.delete("junk")
        assert '"deleted": true' in r.hget(redis_prefix + "scenarios", "junk")
    finally:
        s.stop()
        r.close()


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_a_compare_and_set_put_refuses_a_write_made_since_it_read(backend, tmp_path, request):
    """``expected_version``: the version read (0 = absent); a write in between is a conflict and
    nothing is written; a tombstone (Redis) counts as absent."""
    from service.errors import ConflictError

    if backend == "file":
        a, b = (FileWeightStore(tmp_path / "s.json", OBJ, 0.05) for _ in range(2))
    else:
        prefix = request.getfixturevalue("redis_prefix")
        a, b = (RedisWeightStore(REDIS_URL, prefix, OBJ, 0.05, 0.5) for _ in range(2))
    a.start(), b.start()
    try:
        assert a.wait_synced(2) and b.wait_synced(2)
        w = {"exposure": 1.0, "click": 1.0, "conversion": 1.0}
        read = a.put("x", w, "first", expected_version=0).version  # absent, as expected
        with pytest.raises(ConflictError, match="'x' is at version"):
            a.put("x", w, "again as new", expected_version=0)
        b.put("x", {**w, "click": 5.0}, "a concurrent admin write")
        with pytest.raises(ConflictError, match="changed since it was read"):
            a.put("x", {**w, "click": 9.0}, "tune", expected_version=read)
        seen = wait_until(lambda: a.get("x").weights["click"] == 5.0, 2, "a to sync b's write")
        assert seen and b.get("x").description == "a concurrent admin write"  # not overwritten
        now = b.get("x").version
        assert a.put("x", w, "tune", expected_version=now).description == "tune"
        a.delete("x")
        assert a.put("x", w, "back", expected_version=0).description == "back"
    finally:
        _stop_all(a, b)
