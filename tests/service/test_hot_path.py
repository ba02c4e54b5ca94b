"""The retrieve hot path's shortcuts do what the slow paths they replace do: the orjson
request parser returns pydantic's values or raises pydantic's error, request ids carry a standard
HMAC-SHA256, the response bytes are a valid RetrieveResponse, and excluding seen items after the
search returns what a search-time selector returns."""

from __future__ import annotations

import hashlib
import hmac
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from csmf.bundle import load_bundle
from csmf.index import Where
from service.fast_parse import ParsedRequest, parse_retrieve
from service.schemas import RetrieveRequest, RetrieveResponse

FIELDS = list(RetrieveRequest.model_fields)


def _outcome(parse, body: bytes):
    """(field values) or ("error", pydantic's error list) of parsing ``body``."""
    try:
        req = parse(body)
    except ValidationError as exc:
        return "error", exc.errors(include_url=False)
    return {f: getattr(req, f) for f in FIELDS}


def _same(body: bytes) -> None:
    fast, slow = _outcome(parse_retrieve, body), _outcome(RetrieveRequest.model_validate_json, body)
    # repr: the same values of the same types (1.0 is not 1), and NaN equals NaN
    assert repr(fast) == repr(slow), body


BODIES = [
    b'{"user_id": "u1"}',
    b'{"user_id": "u1", "k": 5, "scenario": "s", "explain": true, "exclude_seen": false}',
    b'{"history": ["i1", "i2"], "weights": {"click": 1, "conversion": 2.5}}',
    b'{"user_id": "u1", "weights": [1, 0, 3], "exclude": ["i3"], "filter": {"field": "g", "eq": 1}}',
    b'{"user_id": "u1", "filter": {"and": [{"field": "p", "gte": 1.5}, {"not": {"field": "q"}}]}}',
    b'{"user_id": null, "history": null, "k": null, "scenario": null, "weights": null}',
    # everything below leaves the fast path: pydantic coerces or refuses, and says so
    b'{"user_id": "u1", "k": 5.0}',
    b'{"user_id": "u1", "k": "5"}',
    b'{"user_id": "u1", "k": true}',
    b'{"user_id": "u1", "k": 99999999999999999999999}',
    b'{"user_id": "u1", "exclude_seen": "true"}',
    b'{"user_id": "u1", "exclude_seen": null}',
    b'{"user_id": "u1", "explain": 1}',
    b'{"user_id": "u1", "weights": {"click": true}}',
    b'{"user_id": "u1", "weights": {"click": "1"}}',
    b'{"user_id": "u1", "weights": [1, 2, 99999999999999999999999]}',
    b'{"user_id": "u1", "weights": [NaN, 1, 1]}',
    b'{"user_id": "u1", "weights": 3}',
    b'{"user_id": "u1", "exclude": null}',
    b'{"user_id": "u1", "exclude": ["", "i1"]}',
    b'{"user_id": "u1", "history": [1, 2]}',
    b'{"user_id": ""}',
    b'{"user_id": 7}',
    b'{"user_id": "u1", "scenaro": "typo"}',
    b'{"user_id": "u1", "filter": [1]}',
    b'{"user_id": "u1", "filter": {"field": "x", "eq": 123456789012345678901234567890}}',
    b'{"user_id": "u1", "filter": ' + b'{"not": ' * 300 + b"1" + b"}" * 300 + b"}",
    b'{"user_id": "u1", "filter": ' + b'{"not": ' * 40 + b"1" + b"}" * 40 + b"}",
    b'{"user_id": "u1", "user_id": "u2"}',
    b'{"user_id": "\\ud800"}',
    b'\xef\xbb\xbf{"user_id": "u1"}',
    b'{"user_id": "\xff"}',
    b"[]",
    b"null",
    b"",
    b"{",
    b'{"user_id": "' + b"x" * 257 + b'"}',
    b'{"user_id": "u1", "history": [' + b'"i",' * 10_000 + b'"i"]}',
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_fast_parser_returns_what_pydantic_returns(body):
    _same(body)


def test_fast_parser_takes_the_fast_path_for_plain_bodies():
    assert isinstance(parse_retrieve(BODIES[0]), ParsedRequest)
    assert isinstance(parse_retrieve(BODIES[3]), ParsedRequest)
    assert isinstance(parse_retrieve(b'{"user_id": "u1", "k": 5.0}'), RetrieveRequest)
    # defaults come from the model, whatever they are
    fast = parse_retrieve(BODIES[0])
    for name, field in RetrieveRequest.model_fields.items():
        if name != "user_id":
            assert getattr(fast, name) == field.get_default(call_default_factory=True), name


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
_value = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_body = st.dictionaries(
    st.sampled_from([*FIELDS, "unknown"]),
    st.one_of(_value, st.lists(st.text(max_size=3), max_size=3)),
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_body)
def test_fast_parser_agrees_with_pydantic_on_random_bodies(body):
    _same(json.dumps(body).encode())


# -- request ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_len", [0, 16, 32, 64, 65, 200])
def test_request_ids_carry_a_standard_hmac(key_len):
    from service.request_ids import RequestIds

    key = bytes(range(256))[:key_len]
    ids = RequestIds(key, 60)
    token, rid = ids.issue("user-7", "sc", "arm-b")
    body, mac = token.rsplit(".", 1)
    assert mac == hmac.new(key, f"{body}\x00user-7".encode(), hashlib.sha256).hexdigest()[:32]
    assert ids.verify(token, "user-7").id == rid
    assert len({ids.issue("u", None, None)[1] for _ in range(2000)}) == 2000  # across refills


# -- response and exclusions -----------------------------------------------------------------------


def test_response_bytes_are_a_valid_response(bundles, make_client):
    client = make_client(bundles["flat"])
    for body in (
        {"user_id": "u1", "k": 5},
        {"user_id": "u1", "k": 5, "weights": [1, 2, 3], "explain": True},
        {"history": ["i1", "nope"], "k": 3, "scenario": "default"},
    ):
        r = client.post("/v1/retrieve", json=body)
        assert r.status_code == 200, r.text
        parsed = RetrieveResponse.model_validate_json(r.content)
        assert json.loads(r.content) == parsed.model_dump(exclude_unset=True)
    assert parsed.warnings and "nope" in parsed.warnings[0]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("after_search", [True, False])
def test_seen_items_dropped_after_the_search_equal_a_selector(
    kind, after_search, bundles, make_client, monkeypatch
):
    import service.retriever as retriever_module

    if not after_search:  # every history goes into the search's selector
        monkeypatch.setattr(retriever_module, "SEEN_AFTER_SEARCH", 0)
    client = make_client(bundles[kind])
    rt = client.app.state.csmf.bundle.retriever
    bundle = load_bundle(bundles[kind], verify=False)
    scale = rt.scale((1.0, 1.8, 1.2))
    for user in bundle.users.ids[:25]:
        row, hist = bundle.users.get(user)
        seen = np.asarray(hist.rows(), np.int64)
        got = rt.retrieve(user, None, scale, 10, exclude_seen=True)
        q = bundle.encoder.encode([row], [hist]) * scale
        scores, rows = bundle.search(q, 10, Where(exclude=seen) if len(seen) else None)
        keep = rows[0] >= 0
        assert got.rows == rows[0][keep].tolist(), user
        np.testing.assert_allclose(got.scores, scores[0][keep], rtol=1e-5)
        assert not set(got.rows) & set(seen.tolist())


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 40),
    pad=st.integers(0, 10),
    seen=st.lists(st.integers(0, 60), max_size=30),
    k=st.integers(1, 50),
    none_seen=st.booleans(),
)
def test_best_keeps_the_first_k_valid_unseen_rows(n, pad, seen, k, none_seen):
    """_best (which stops at the k-th kept row) keeps what filtering the whole list keeps."""
    from service.retriever import _best

    rng = np.random.default_rng(n * 100 + pad)
    rows = np.concatenate([rng.permutation(60)[:n], np.full(pad, -1)]).astype(np.int64)
    scores = np.concatenate([np.sort(rng.random(n))[::-1], np.full(pad, -np.inf)])
    scores = scores.astype(np.float32)
    drop = None if none_seen else np.asarray(seen, dtype=np.int64)
    want = [
        (int(r), float(s))
        for r, s in zip(rows, scores, strict=True)
        if r >= 0 and (drop is None or r not in set(drop.tolist()))
    ][:k]
    got_r, got_s = _best(rows, scores, drop, k)
    assert list(zip(got_r, got_s, strict=True)) == want
