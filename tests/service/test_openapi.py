"""The OpenAPI document agrees with the server (what an API fuzzer checks): /metrics is text,
request weights are constrained the way parse_weights enforces them, with the served bundle's
objective names and count, and a body that is not UTF-8 is a documented 422, not a bare 400."""

from __future__ import annotations

import pytest
from fixtures.services import AUTH


@pytest.fixture
def doc(client):
    return client.get("/openapi.json").json()


@pytest.fixture
def client(bundles, make_client):
    return make_client(bundles["flat"])


def _weights_schemas(doc) -> list[dict]:
    """Every request-body `weights` schema (object-or-list); responses have plain objects."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            w = node.get("properties", {}).get("weights")
            if w is not None:
                alts = [a for a in w.get("anyOf", []) if a.get("type") != "null"]
                alts = alts[0]["anyOf"] if len(alts) == 1 and "anyOf" in alts[0] else alts
                if {a.get("type") for a in alts} == {"object", "array"}:
                    found.append({a["type"]: a for a in alts})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


def test_metrics_is_documented_as_text(doc, client):
    content = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_weights_schema_says_what_the_server_enforces(doc, client):
    schemas = _weights_schemas(doc)
    # /v1/retrieve, /v1/retrieve/batch, PUT /admin/scenarios/{name} and its experiment arms
    assert len(schemas) == 4
    objectives = ["exposure", "click", "conversion"]
    for s in schemas:
        obj, arr = s["object"], s["array"]
        assert obj["propertyNames"] == {"enum": objectives} and obj["minProperties"] == 1
        assert arr["minItems"] == arr["maxItems"] == 3
        for value in (obj["additionalProperties"], arr["items"]):
            assert value == {"type": "number", "minimum": 0, "maximum": 1e6}
    assert "x-csmf-weights" not in str(doc)
    # ... and the server rejects exactly what the schema rules out
    for bad in ([], [1, 1], [1, 1, 1, 1], {}, {"purchase": 1}, [1e7, 1, 1], [-1, 1, 1]):
        r = client.put("/admin/scenarios/x", json={"weights": bad}, headers=AUTH)
        assert r.status_code == 422, (bad, r.text)
        r = client.post("/v1/retrieve", json={"user_id": "u1", "weights": bad})
        assert r.status_code == 422, (bad, r.text)
    for good in ([0, 0, 1e6], {"click": 1}, [1, 1.8, 1.2]):
        assert (
            client.put("/admin/scenarios/x", json={"weights": good}, headers=AUTH).status_code
            == 200
        )


def test_weights_schema_without_a_bundle_has_the_static_constraints():
    from pathlib import Path

    from service.main import create_app
    from service.settings import Settings

    doc = create_app(Settings(_env_file=None, bundle=Path("/none"))).openapi()
    for s in _weights_schemas(doc):
        assert "propertyNames" not in s["object"] and s["array"]["minItems"] == 1
    assert "x-csmf-weights" not in str(doc)


@pytest.mark.parametrize(
    ("method", "path"),
    [("put", "/admin/scenarios/{name}"), ("post", "/admin/reload"), ("post", "/v1/retrieve")],
)
def test_non_utf8_body_is_a_documented_422(client, doc, method, path):
    r = client.request(
        method, path.replace("{name}", "x"), content=b'{"weights": "\xff\xfe"}',
        headers={**AUTH, "content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 422, r.text  # was 400 "There was an error parsing the body"
    assert r.json()["detail"][0]["loc"] == ["body"]
    assert "422" in doc["paths"][path][method]["responses"]
