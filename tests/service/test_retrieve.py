"""Retrieval correctness through the HTTP API: scores are sum_t k_t s_t of the bundle's vectors,
explain gives s_t, exclusions are exact for every index type, cold start, batch = singles."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from fixtures.services import AUTH

from csmf.bundle import load_bundle

KINDS = ("flat", "hnsw", "ivf")
WEIGHTS = {"exposure": 0.5, "click": 2.0, "conversion": 1.5}


def _truth(bundle, user_id=None, history=None):
    """(D,) user vector, (N, D) item vectors, (N, T) per-objective scores s_t for one user."""
    snap = bundle.users.get(user_id) if user_id is not None else None
    row, hist = snap if snap else ({"user_id": user_id} if user_id else {}, [])
    if history is not None:
        hist = history
    e = bundle.encoder.encode([row], [hist])[0]
    v = bundle.item_vectors(np.arange(len(bundle.index)))
    bounds = bundle.slice_bounds()
    per_slice = np.stack([(v[:, a:b] * e[a:b]).sum(1) for a, b in bounds], axis=1)
    return e, v, np.cumsum(per_slice, axis=1)


def _expected(bundle, s_t, weights, k, excluded=()):
    fused = s_t @ np.array([weights[o] for o in bundle.objectives])
    fused[list(excluded)] = -np.inf
    order = np.argsort(-fused, kind="stable")[:k]
    return order, fused


@pytest.fixture(scope="module")
def loaded(bundles):
    return {kind: load_bundle(bundles[kind]) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_the_weighted_sum_of_objective_scores(kind, bundles, loaded, make_client):
    client, bundle = make_client(bundles[kind]), loaded[kind]
    user = bundle.users.ids[3]
    r = client.post(
        "/v1/retrieve", json={"user_id": user, "k": 20, "weights": WEIGHTS, "explain": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    _, _, s_t = _truth(bundle, user)
    order, fused = _expected(bundle, s_t, WEIGHTS, 20)
    rows = [bundle.item_rows[it["item_id"]] for it in body["items"]]
    got = np.array([it["score"] for it in body["items"]])
    np.testing.assert_allclose(got, fused[rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, fused[order], rtol=1e-4, atol=1e-5)  # the true top 20
    for it, row in zip(body["items"], rows, strict=True):
        np.testing.assert_allclose(
            [it["scores"][o] for o in bundle.objectives], s_t[row], rtol=1e-4, atol=1e-5
        )
        assert it["meta"]["title"] == bundle.item_meta["title"][row]
    assert body["weights"] == WEIGHTS and body["scenario"] is None
    assert body["model_version"] == bundle.model_version and body["cold_start"] is False
    assert body["took_ms"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_exclusions_are_exact(kind, bundles, loaded, make_client):
    """Search-time selectors: the result is brute force over the allowed items, item for item."""
    client, bundle = make_client(bundles[kind]), loaded[kind]
    user = bundle.users.ids[5]
    _, _, s_t = _truth(bundle, user)
    top, _ = _expected(bundle, s_t, WEIGHTS, 40)
    exclude = [bundle.item_ids[r] for r in top[::2]]  # every other item of the true top 40
    _, hist = bundle.users.get(user)
    excluded = {bundle.item_rows[i] for i in exclude} | {
        bundle.item_rows[h] for h in hist if h in bundle.item_rows
    }
    r = client.post(
        "/v1/retrieve",
        json={
            "user_id": user,
            "k": 30,
            "weights": WEIGHTS,
            "exclude": exclude,
            "exclude_seen": True,
        },
    )
    assert r.status_code == 200, r.text
    got = [bundle.item_rows[it["item_id"]] for it in r.json()["items"]]
    want, _ = _expected(bundle, s_t, WEIGHTS, 30, excluded)
    assert not set(got) & excluded
    assert got == want.tolist()


def test_hnsw_exclusions_hold_with_an_unbounded_queue(bundles, make_client):
    """faiss #5504: with search_bounded_queue=False HNSW ignores ID selectors; the service always
    searches with a bounded queue when it passes a selector."""
    client = make_client(bundles["hnsw"])
    index = client.app.state.csmf.bundle.retriever.bundle.index.index
    faiss.downcast_index(index).hnsw.search_bounded_queue = False
    first = client.post("/v1/retrieve", json={"user_id": "u1", "k": 10}).json()["items"]
    exclude = [it["item_id"] for it in first]
    again = client.post("/v1/retrieve", json={"user_id": "u1", "k": 10, "exclude": exclude}).json()[
        "items"
    ]
    assert len(again) == 10
    assert not {it["item_id"] for it in again} & set(exclude)


def test_excluding_almost_everything_returns_what_is_left(bundles, loaded, make_client):
    client, bundle = make_client(bundles["flat"]), loaded["flat"]
    keep = {"i1", "i2", "i3"}
    exclude = [i for i in bundle.item_ids.tolist() if i not in keep]
    r = client.post("/v1/retrieve", json={"user_id": "u2", "k": 10, "exclude": exclude})
    assert r.status_code == 200, r.text
    assert {it["item_id"] for it in r.json()["items"]} == keep


def test_cold_start_and_inline_history(bundles, loaded, make_client):
    client, bundle = make_client(bundles["flat"]), loaded["flat"]
    cold = client.post(
        "/v1/retrieve", json={"user_id": "nobody-knows-me", "k": 5, "weights": WEIGHTS}
    ).json()
    assert cold["cold_start"] is True
    _, _, s_t = _truth(bundle)  # no id, no features, no history
    want, fused = _expected(bundle, s_t, WEIGHTS, 5)
    np.testing.assert_allclose(
        [it["score"] for it in cold["items"]], fused[want], rtol=1e-4, atol=1e-5
    )

    hist = ["i10", "i20", "i30"]
    warm = client.post("/v1/retrieve", json={"history": hist, "k": 5, "weights": WEIGHTS}).json()
    assert warm["cold_start"] is False
    _, _, s_t = _truth(bundle, None, hist)
    want, fused = _expected(bundle, s_t, WEIGHTS, 5)
    assert [bundle.item_rows[it["item_id"]] for it in warm["items"]] == want.tolist()

    # a known user's inline history replaces the stored one
    user = bundle.users.ids[7]
    r = client.post(
        "/v1/retrieve", json={"user_id": user, "history": hist, "k": 5, "weights": WEIGHTS}
    ).json()
    _, _, s_t = _truth(bundle, user, hist)
    want, _ = _expected(bundle, s_t, WEIGHTS, 5)
    assert [bundle.item_rows[it["item_id"]] for it in r["items"]] == want.tolist()


def test_exclude_seen_is_on_by_default(bundles, loaded, make_client):
    """A frontend asking without options is never recommended what the user already saw."""
    client, bundle = make_client(bundles["flat"]), loaded["flat"]
    k = 200  # of a few hundred items: the brute-force top k holds some seen items
    for user in bundle.users.ids[:5]:
        _, hist = bundle.users.get(user)
        seen = {bundle.item_rows[h] for h in hist if h in bundle.item_rows}
        _, _, s_t = _truth(bundle, user)
        top, _ = _expected(bundle, s_t, WEIGHTS, k)
        if not seen & set(top.tolist()):
            continue
        body = {"user_id": user, "k": k, "weights": WEIGHTS}
        default = client.post("/v1/retrieve", json=body).json()["items"]
        got = [bundle.item_rows[it["item_id"]] for it in default]
        want, _ = _expected(bundle, s_t, WEIGHTS, k, excluded=seen)
        assert got == want.tolist() and not seen & set(got)
        allowed = client.post("/v1/retrieve", json={**body, "exclude_seen": False}).json()
        assert [bundle.item_rows[it["item_id"]] for it in allowed["items"]] == top.tolist()
        batch = client.post("/v1/retrieve/batch", json={"users": [{"user_id": user}], "k": k})
        rows = {bundle.item_rows[it["item_id"]] for it in batch.json()["results"][0]["items"]}
        assert len(rows) == k and not seen & rows
        return
    pytest.fail("no user with a seen item in its top k: the test proves nothing")


def test_unknown_inline_history_is_flagged(bundles, loaded, make_client):
    """Inline ids the bundle does not know are reported; only unknown ids = cold start."""
    client, bundle = make_client(bundles["flat"]), loaded["flat"]
    ghosts = ["no-such-item-1", "no-such-item-2"]
    r = client.post("/v1/retrieve", json={"history": ghosts, "k": 5, "weights": WEIGHTS}).json()
    assert r["cold_start"] is True
    assert r["warnings"] == [
        "history: none of its 2 item ids is in the served bundle ('no-such-item-1', "
        "'no-such-item-2'); it was ignored"
    ]
    _, _, s_t = _truth(bundle)  # the cold-start vector's ranking
    want, _ = _expected(bundle, s_t, WEIGHTS, 5)
    assert [bundle.item_rows[it["item_id"]] for it in r["items"]] == want.tolist()

    partial = client.post("/v1/retrieve", json={"history": ["i10", ghosts[0]], "k": 5}).json()
    assert partial["cold_start"] is False
    assert partial["warnings"] == [
        "history: 1 of its 2 item ids are not in the served bundle ('no-such-item-1')"
    ]
    known = bundle.users.ids[2]  # a stored user keeps its features: not cold, still warned
    mixed = client.post("/v1/retrieve", json={"user_id": known, "history": ghosts}).json()
    assert mixed["cold_start"] is False and "none of its 2" in mixed["warnings"][0]
    clean = client.post("/v1/retrieve", json={"history": ["i10"], "k": 5}).json()
    assert "warnings" not in clean

    users = [{"history": ghosts}, {"history": ["i10"]}, {"user_id": known, "history": ghosts}]
    res = client.post("/v1/retrieve/batch", json={"users": users, "k": 5}).json()["results"]
    assert [x["cold_start"] for x in res] == [True, False, False]
    assert [len(x.get("warnings", [])) for x in res] == [1, 0, 1]
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("RetrieveResponse", "BatchResult"):
        assert schema[name]["properties"]["warnings"]["anyOf"][0]["type"] == "array"
        assert "warnings" not in schema[name].get("required", [])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_batch_equals_single_calls(kind, bundles, make_client):
    client = make_client(bundles[kind])
    users = [{"user_id": "u1"}, {"user_id": "ghost"}, {"history": ["i5", "i6"]}, {"user_id": "u9"}]
    opts = {
        "k": 8,
        "weights": WEIGHTS,
        "exclude": ["i100", "i200"],
        "exclude_seen": True,
        "explain": True,
    }
    r = client.post("/v1/retrieve/batch", json={"users": users, **opts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["cold_start"] for x in results] == [False, True, False, False]
    for u, res in zip(users, results, strict=True):
        single = client.post("/v1/retrieve", json={**u, **opts}).json()
        assert [it["item_id"] for it in res["items"]] == [it["item_id"] for it in single["items"]]
        np.testing.assert_allclose(
            [it["score"] for it in res["items"]], [it["score"] for it in single["items"]], rtol=1e-5
        )


def test_scenario_weights_are_used(bundles, make_client):
    client = make_client(bundles["flat"])
    default = client.post("/v1/retrieve", json={"user_id": "u1", "k": 5}).json()
    assert default["scenario"] == "default"
    assert default["weights"] == {"exposure": 1.0, "click": 1.8, "conversion": 1.2}
    r = client.put("/admin/scenarios/promo", json={"weights": WEIGHTS}, headers=AUTH)
    assert r.status_code == 200, r.text
    by_name = client.post(
        "/v1/retrieve", json={"user_id": "u1", "k": 5, "scenario": "promo"}
    ).json()
    explicit = client.post(
        "/v1/retrieve", json={"user_id": "u1", "k": 5, "weights": WEIGHTS}
    ).json()
    assert by_name["scenario"] == "promo" and by_name["weights"] == WEIGHTS
    assert by_name["items"] == explicit["items"]


# -- attribute filters -----------------------------------------------------------------------------

FILTER = {"and": [{"field": "genre", "in": ["drama", "comedy"]}, {"field": "price", "lt": 30}]}


def _allowed(bundle, pred) -> np.ndarray:
    """(N,) bool from the bundle's item table, read with plain pyarrow (not the filter code)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(bundle.path / "items.parquet").to_pylist()
    return np.array([pred(r) for r in rows])


@pytest.mark.parametrize("kind", KINDS)
def test_filter_with_exclusions_matches_brute_force(kind, bundles, loaded, make_client):
    client, bundle = make_client(bundles[kind]), loaded[kind]
    assert set(bundle.attributes.schema) == {"genre", "price"}  # the spec's scalar item features
    user = bundle.users.ids[4]
    ok = _allowed(bundle, lambda r: r["genre"] in ("drama", "comedy") and r["price"] < 30)
    assert 0.1 < ok.mean() < 0.5
    _, _, s_t = _truth(bundle, user)
    first, _ = _expected(bundle, s_t, WEIGHTS, 40, excluded=np.flatnonzero(~ok))
    exclude = [bundle.item_ids[r] for r in first[:10:3]]
    _, hist = bundle.users.get(user)
    excluded = set(np.flatnonzero(~ok).tolist()) | {bundle.item_rows[i] for i in exclude}
    excluded |= {bundle.item_rows[h] for h in hist if h in bundle.item_rows}
    body = {"user_id": user, "k": 25, "weights": WEIGHTS, "exclude": exclude, "exclude_seen": True}
    r = client.post("/v1/retrieve", json={**body, "filter": FILTER})
    assert r.status_code == 200, r.text
    got = [bundle.item_rows[it["item_id"]] for it in r.json()["items"]]
    want, _ = _expected(bundle, s_t, WEIGHTS, 25, excluded)
    assert ok[got].all() and not set(got) & excluded
    if kind == "hnsw":  # filtered graph search stays approximate even with ef >= N (22/25 here)
        assert len(set(got) & set(want.tolist())) >= 0.8 * len(want)
    else:
        assert got == want.tolist()


def test_selective_filter_is_exact_on_hnsw(bundles, loaded, make_client):
    """A filter allowing < 1 % of the catalogue searches exactly over the allowed rows."""
    client, bundle = make_client(bundles["hnsw"]), loaded["hnsw"]
    prices = np.sort(np.array(bundle.attributes._cols["price"][1]))
    cut = float(prices[-8])  # the 8 most expensive items: 0.5 % of 1500
    ok = _allowed(bundle, lambda r: r["price"] >= cut)
    r = client.post(
        "/v1/retrieve",
        json={
            "user_id": "u3",
            "k": 5,
            "weights": WEIGHTS,
            "filter": {"field": "price", "gte": cut},
        },
    )
    assert r.status_code == 200, r.text
    _, _, s_t = _truth(bundle, "u3")
    want, _ = _expected(bundle, s_t, WEIGHTS, 5, excluded=np.flatnonzero(~ok))
    assert [bundle.item_rows[it["item_id"]] for it in r.json()["items"]] == want.tolist()


@pytest.mark.parametrize(
    ("flt", "loc", "message"),
    [
        ({"field": "colour", "eq": "red"}, ["filter", "field"], 'unknown filter field "colour"'),
        ({"field": "price", "eq": "cheap"}, ["filter", "eq"], "'price' is a number field"),
        ({"field": "genre", "gte": 3}, ["filter", "gte"], "need a number field, 'genre' is string"),
        (
            {"or": [{"field": "genre", "eq": "drama"}, {"field": "genre", "in": []}]},
            ["filter", "or", 1, "in"],
            "expected a list of 1..1024 values",
        ),
        ({"field": "genre"}, ["filter"], "needs one of eq, in, gt, gte, lt, lte"),
        ({"genre": "drama"}, ["filter"], "a filter is one of"),
        ({"field": "price", "gt": 1, "gte": 2}, ["filter"], "at most one lower"),
    ],
)
def test_bad_filters_are_422_naming_the_part(flt, loc, message, bundles, make_client):
    client = make_client(bundles["flat"])
    for path, body in (
        ("/v1/retrieve", {"user_id": "u1", "filter": flt}),
        ("/v1/retrieve/batch", {"users": [{"user_id": "u1"}], "filter": flt}),
    ):
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        (detail,) = r.json()["detail"]
        assert detail["loc"] == ["body", *loc] and message in detail["msg"], detail


def test_batch_with_filter_equals_single_calls(bundles, make_client):
    client = make_client(bundles["ivf"])
    users = [{"user_id": "u1"}, {"user_id": "ghost"}, {"history": ["i5", "i6"]}]
    opts = {"k": 8, "weights": WEIGHTS, "exclude_seen": True, "filter": FILTER}
    r = client.post("/v1/retrieve/batch", json={"users": users, **opts})
    assert r.status_code == 200, r.text
    for u, res in zip(users, r.json()["results"], strict=True):
        single = client.post("/v1/retrieve", json={**u, **opts}).json()
        assert [it["item_id"] for it in res["items"]] == [it["item_id"] for it in single["items"]]
    info = client.get("/admin/bundle", headers=AUTH).json()
    assert info["filterable"] == {"genre": "string", "price": "number"}
