"""Every 422 path, 404/413, admin auth and CRUD, reload (good and corrupt), health and metrics."""

from __future__ import annotations

import json
import math

import pytest
from fixtures.services import AUTH
from prometheus_client.parser import text_string_to_metric_families

from service.schemas import MAX_LIST


@pytest.fixture
def client(bundles, make_client):
    return make_client(bundles["flat"])


def _loc(r) -> list:
    assert r.status_code == 422, r.text
    return [tuple(d["loc"]) for d in r.json()["detail"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "k": 201}, "k"),  # max_k = 200 in these tests
        ({"user_id": "u1", "k": "many"}, "k"),
        ({"user_id": "u1", "k": 2.5}, "k"),
        ({"user_id": "u1", "weights": {"click": -1}}, "weights"),
        ({"user_id": "u1", "weights": {"click": 0, "exposure": 0}}, "weights"),
        ({"user_id": "u1", "weights": [0, 0, 0]}, "weights"),
        ({"user_id": "u1", "weights": {"purchase": 1}}, "weights"),
        ({"user_id": "u1", "weights": [1, 2]}, "weights"),
        ({"user_id": "u1", "weights": {"click": "x"}}, "weights"),
        ({"user_id": "u1", "weights": [1, 2, 3], "scenario": "default"}, "scenario"),
        ({"k": 5}, "user_id"),
        ({"user_id": "u1", "scenaro": "default"}, "scenaro"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "x" * 300}, "user_id"),
        ({"user_id": "u1", "exclude": ["i1"] * (MAX_LIST + 1)}, "exclude"),
        ({"user_id": "u1", "history": "i1"}, "history"),
        ({"user_id": "u1", "explain": "very"}, "explain"),
        ({"user_id": 7}, "user_id"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, body, field):
    locs = _loc(client.post("/v1/retrieve", json=body))
    assert any(loc[:2] == ("body", field) for loc in locs), locs


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_weights_are_422(client, token):
    body = '{"user_id": "u1", "weights": {"exposure": 1, "click": TOKEN}}'.replace("TOKEN", token)
    r = client.post("/v1/retrieve", content=body, headers={"content-type": "application/json"})
    assert ("body", "weights") in _loc(r)
    assert "finite" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("path", ["/v1/retrieve", "/v1/retrieve/batch"])
def test_overflowing_weights_are_422_and_scores_always_finite(client, path):
    user = {"user_id": "u1"} if path == "/v1/retrieve" else {"users": [{"user_id": "u1"}]}
    r = client.post(path, json={**user, "k": 5, "weights": [1e308, 1, 1]})
    assert r.status_code == 422 and "must be <= 1e+06" in r.json()["detail"][0]["msg"], r.text
    for weights in ([1e6, 1e6, 1e6], [1e-6, 0, 0], [1e6, 0, 1e-6]):  # the extremes allowed
        r = client.post(path, json={**user, "k": 5, "weights": weights, "explain": True})
        assert r.status_code == 200, r.text
        assert "Infinity" not in r.text and "NaN" not in r.text
        body = json.loads(r.text)
        items = body["items"] if "items" in body else body["results"][0]["items"]
        assert len(items) == 5
        assert all(math.isfinite(i["score"]) for i in items)
        assert all(math.isfinite(v) for i in items for v in i["scores"].values())


def test_invalid_json_and_empty_body_are_422(client):
    for raw in (b"{not json", b"", b"[1, 2]"):
        r = client.post("/v1/retrieve", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][0] == "body"


def test_unknown_scenario_is_404_naming_no_other_scenario(client):
    secret = "q3-promo-partner-x"
    r = client.put(f"/admin/scenarios/{secret}", json={"weights": [1, 1, 1]}, headers=AUTH)
    assert r.status_code == 200, r.text
    for path, body in [
        ("/v1/retrieve", {"user_id": "u1", "scenario": "nope"}),
        ("/v1/retrieve/batch", {"users": [{"user_id": "u1"}], "scenario": "nope"}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 404
        detail = r.json()["detail"]
        assert detail.startswith("unknown scenario 'nope'"), detail
        assert secret not in detail and "default" not in detail, detail


def test_batch_errors(client):
    assert ("body", "users") in [
        tuple(x[:2]) for x in _loc(client.post("/v1/retrieve/batch", json={"users": []}))
    ]
    r = client.post("/v1/retrieve/batch", json={"users": [{"user_id": "u1"}, {}]})
    assert ("body", "users", 1, "user_id") in _loc(r)
    r = client.post(
        "/v1/retrieve/batch", json={"users": [{"user_id": "u1"}] * 51}
    )  # max_batch = 50
    assert r.status_code == 413 and "at most 50 users" in r.json()["detail"]
    r = client.post("/v1/retrieve/batch", json={"users": [{"user_id": "u1"}], "k": 0})
    assert ("body", "k") in _loc(r)


def test_oversized_body_is_413(bundles, make_client):
    client = make_client(bundles["flat"], max_body_bytes=4096)
    big = {"user_id": "u1", "exclude": [f"i{i}" for i in range(2000)]}
    r = client.post("/v1/retrieve", json=big)
    assert r.status_code == 413 and "limit is 4096" in r.json()["detail"]

    def chunks():  # no content-length: the limit holds while streaming
        yield b'{"user_id": "u1", "exclude": ['
        for _ in range(1000):
            yield b'"i1",'
        yield b'"i2"]}'

    r = client.post("/v1/retrieve", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_nothing_a_client_sends_crashes_the_service(client):
    junk = [
        b"\xff\xfe",
        b'{"user_id": null, "history": null}',
        b'{"user_id": "u1", "k": 1e309}',
        b"null",
    ]
    for raw in junk:
        r = client.post("/v1/retrieve", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    assert client.post("/v1/retrieve", json={"user_id": "u1"}).status_code == 200


# -- admin ------------------------------------------------------------------------------------------


def test_admin_auth(client, bundles, make_client):
    assert client.get("/admin/scenarios").status_code == 401
    assert client.get("/admin/scenarios").headers["www-authenticate"] == "Bearer"
    assert client.get("/admin/scenarios", headers={"authorization": "Basic abc"}).status_code == 401
    r = client.put(
        "/admin/scenarios/x", json={"weights": [1, 1, 1]}, headers={"authorization": "Bearer nope"}
    )
    assert r.status_code == 403 and r.json()["detail"] == "invalid admin token"
    assert client.post("/admin/reload", headers={"authorization": "Bearer nope"}).status_code == 403
    assert client.get("/admin/scenarios", headers=AUTH).status_code == 200
    disabled = make_client(bundles["flat"], admin_token=None)
    r = disabled.get("/admin/scenarios", headers=AUTH)
    assert r.status_code == 403
    assert r.json()["detail"] == "admin API is disabled: set CSMF_ADMIN_TOKEN to enable it"
    # without the token nothing changed
    names = [s["name"] for s in client.get("/admin/scenarios", headers=AUTH).json()["scenarios"]]
    assert names == ["default"]


def test_scenario_crud(client):
    default = client.get("/admin/scenarios/default", headers=AUTH).json()
    assert default["weights"] == {"exposure": 1.0, "click": 1.8, "conversion": 1.2}
    assert default["version"] >= 1 and default["updated_at"].endswith("Z")
    r = client.put(
        "/admin/scenarios/promo",
        json={"weights": {"click": 1, "conversion": 3}, "description": "d"},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["weights"] == {"exposure": 0.0, "click": 1.0, "conversion": 3.0}
    assert (s["version"], s["description"]) == (1, "d")
    s2 = client.put("/admin/scenarios/promo", json={"weights": [1, 1, 1]}, headers=AUTH).json()
    assert s2["version"] == 2 and s2["updated_at"] >= s["updated_at"]
    listed = client.get("/admin/scenarios", headers=AUTH).json()
    assert [x["name"] for x in listed["scenarios"]] == ["default", "promo"]
    assert (listed["store"], listed["state"]) == ("file", "ok")
    assert client.delete("/admin/scenarios/promo", headers=AUTH).status_code == 200
    assert client.get("/admin/scenarios/promo", headers=AUTH).status_code == 404
    assert client.delete("/admin/scenarios/promo", headers=AUTH).status_code == 404
    r = client.delete("/admin/scenarios/default", headers=AUTH)
    assert r.status_code == 409 and "cannot be deleted" in r.json()["detail"]


@pytest.mark.parametrize(
    ("weights", "msg"),
    [
        ({"click": float("nan")}, "finite"),
        ([-1, 1, 1], ">= 0"),
        ([0, 0, 0], "all be zero"),
        ({"purchase": 1}, "unknown objective"),
        ([1, 1], "expected 3 weights"),
        ([], "expected 3 weights"),
        ({}, "all be zero"),
        ([1e308, 1, 1], "must be <= 1e+06"),  # was accepted: every retrieve then came back empty
    ],
)
def test_scenario_validation(client, weights, msg):
    import json

    body = json.dumps({"weights": weights}).replace("NaN", "NaN")
    r = client.put(
        "/admin/scenarios/bad", content=body, headers={**AUTH, "content-type": "application/json"}
    )
    assert ("body", "weights") in _loc(r)
    assert msg in r.json()["detail"][0]["msg"]
    assert client.get("/admin/scenarios/bad", headers=AUTH).status_code == 404


def test_scenario_name_is_validated(client):
    r = client.put("/admin/scenarios/has%20space", json={"weights": [1, 1, 1]}, headers=AUTH)
    assert ("path", "name") in _loc(r)


def test_embedded_store_survives_restart(bundles, make_client):
    first = make_client(bundles["flat"])
    first.put("/admin/scenarios/kept", json={"weights": [1, 2, 3]}, headers=AUTH)
    first.__exit__(None, None, None)
    second = make_client(bundles["flat"])  # same scenarios file (same tmp_path)
    s = second.get("/admin/scenarios/kept", headers=AUTH).json()
    assert s["weights"] == {"exposure": 1.0, "click": 2.0, "conversion": 3.0}
    r = second.post("/v1/retrieve", json={"user_id": "u1", "scenario": "kept"})
    assert r.status_code == 200 and r.json()["weights"]["conversion"] == 3.0


# -- bundle and reload --------------------------------------------------------------------------


def test_bundle_info(client, bundles):
    info = client.get("/admin/bundle", headers=AUTH).json()
    assert info["path"] == str(bundles["flat"])
    assert info["objectives"] == ["exposure", "click", "conversion"]
    assert info["index_type"] == "flat" and info["items"] == 1500 and info["users"] == 60
    assert "files" not in info["manifest"]
    # ~1500 item prefixes of at least '{"item_id":"…","score":' (24 bytes) plus a pointer each
    assert info["response_json_bytes"] >= 1500 * (24 + 8)


def test_reload_good_and_corrupt(client, bundles, corrupt_bundle):
    before = client.get("/admin/bundle", headers=AUTH).json()["model_version"]
    r = client.post("/admin/reload", json={"bundle": str(corrupt_bundle)}, headers=AUTH)
    assert r.status_code == 422
    assert "checksum mismatch for index.faiss" in r.json()["detail"]
    assert r.json()["serving"] == before
    ok = client.post("/v1/retrieve", json={"user_id": "u1", "k": 3})
    assert ok.status_code == 200 and ok.json()["model_version"] == before
    r = client.post("/admin/reload", json={"bundle": str(bundles["other"])}, headers=AUTH)
    assert r.status_code == 200, r.text
    after = r.json()["bundle"]["model_version"]
    assert after != before and r.json()["previous"] == before
    assert (
        client.post("/v1/retrieve", json={"user_id": "u1", "k": 3}).json()["model_version"] == after
    )
    r = client.post("/admin/reload", json={"bundle": "/nonexistent/bundle"}, headers=AUTH)
    assert r.status_code == 422 and "no bundle at /nonexistent/bundle" in r.json()["detail"]
    r = client.post("/admin/reload", headers=AUTH)  # no body: the configured bundle again
    assert r.status_code == 200 and r.json()["bundle"]["model_version"] == before
    m = _metrics(client)
    assert m[("csmf_bundle_reloads_total", (("result", "success"),))] == 2
    assert m[("csmf_bundle_reloads_total", (("result", "failure"),))] == 2


# -- health and metrics -------------------------------------------------------------------------


def _metrics(client) -> dict:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ok" and ready["weight_store"]["backend"] == "file"
    for _ in range(3):
        client.post("/v1/retrieve", json={"user_id": "u1", "k": 5})
    client.post("/v1/retrieve", json={"user_id": "zzz", "k": 5, "weights": [1, 1, 1]})
    client.post("/v1/retrieve", json={"user_id": "u1", "k": 0})
    m = _metrics(client)
    hist = "csmf_http_request_duration_seconds_count"
    assert m[(hist, (("route", "/v1/retrieve"), ("status", "200")))] == 4
    assert m[(hist, (("route", "/v1/retrieve"), ("status", "422")))] == 1
    assert (
        "csmf_http_request_duration_seconds_bucket",
        (("le", "0.0005"), ("route", "/v1/retrieve"), ("status", "200")),
    ) in m
    for stage in ("features", "encode", "search"):
        assert m[("csmf_retrieve_stage_seconds_count", (("stage", stage),))] >= 4
    assert (
        m[("csmf_retrieve_requests_total", (("endpoint", "single"), ("scenario", "default")))] == 3
    )
    assert (
        m[("csmf_retrieve_requests_total", (("endpoint", "single"), ("scenario", "_explicit")))]
        == 1
    )
    assert m[("csmf_retrieve_users_total", (("cold_start", "true"), ("endpoint", "single")))] == 1
    assert m[("csmf_scenario_weight", (("objective", "click"), ("scenario", "default")))] == 1.8
    assert m[("csmf_index_vectors", ())] == 1500
    info = [k for k in m if k[0] == "csmf_bundle_info"]
    assert len(info) == 1 and dict(info[0][1])["index_type"] == "flat"
    assert m[("csmf_store_up", (("store", "weights"),))] == 1
    assert m[("csmf_store_errors_total", (("store", "weights"),))] == 0


def test_each_app_has_its_own_registry(bundles, make_client):
    a, b = make_client(bundles["flat"]), make_client(bundles["flat"])
    a.post("/v1/retrieve", json={"user_id": "u1"})
    key = (
        "csmf_http_request_duration_seconds_count",
        (("route", "/v1/retrieve"), ("status", "200")),
    )
    assert _metrics(a)[key] == 1 and _metrics(b)[key] == 0
