"""POST /v1/retrieve's body parser for the hot path: orjson plus exact checks of the common shape,
pydantic for everything else.

``RetrieveRequest.model_validate_json`` costs ~10 µs per body, most of it building the model.
Here the body is decoded by orjson (~1.5 µs) and accepted only if every field already has the
exact type and bounds the model declares — the case in which pydantic would return the very same
values. Anything else (a wrong type, a value pydantic would coerce such as ``"k": 5.0``, an
unknown field, a JSON quirk the two decoders treat differently) goes to pydantic, which returns
its model or raises its ValidationError: the 422 bodies, the coercions and the OpenAPI schema stay
pydantic's. Defaults are read from the model, so a changed default applies to both paths.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.schemas import MAX_LIST, RetrieveRequest

_FIELDS = RetrieveRequest.model_fields
_KNOWN = frozenset(_FIELDS)
_ID_MAX = 256  # schemas.Id: 1..256 characters
_DEFAULT_K = _FIELDS["k"].default
_DEFAULT_SCENARIO = _FIELDS["scenario"].default
_DEFAULT_WEIGHTS = _FIELDS["weights"].default
_DEFAULT_SEEN = _FIELDS["exclude_seen"].default
_DEFAULT_EXPLAIN = _FIELDS["explain"].default
_DEFAULT_FILTER = _FIELDS["filter"].default
_DEFAULT_USER = _FIELDS["user_id"].default
_DEFAULT_HISTORY = _FIELDS["history"].default
# orjson decodes integers beyond 64 bits as floats (pydantic keeps them as ints) and nests up to
# 1024 levels (pydantic's decoder stops earlier): filters outside these bounds take pydantic's path.
_BIG = float(2**63)
_MAX_DEPTH = 32


class ParsedRequest:
    """The fields of a RetrieveRequest, as the route reads them (no pydantic model built)."""

    __slots__ = (
        "user_id", "history", "k", "scenario", "weights", "exclude", "exclude_seen", "explain",
        "filter",
    )  # fmt: skip

    def __init__(self, d: dict) -> None:
        self.user_id = d.get("user_id", _DEFAULT_USER)
        self.history = d.get("history", _DEFAULT_HISTORY)
        self.k = d.get("k", _DEFAULT_K)
        self.scenario = d.get("scenario", _DEFAULT_SCENARIO)
        self.weights = d.get("weights", _DEFAULT_WEIGHTS)
        self.exclude = d.get("exclude") or []
        self.exclude_seen = d.get("exclude_seen", _DEFAULT_SEEN)
        self.explain = d.get("explain", _DEFAULT_EXPLAIN)
        self.filter = d.get("filter", _DEFAULT_FILTER)


def parse_retrieve(body: bytes) -> ParsedRequest | RetrieveRequest:
    """The request in ``body``; raises pydantic's ValidationError exactly where the model would."""
    try:
        d = orjson.loads(body)
    except orjson.JSONDecodeError:
        d = None
    if type(d) is dict and _simple(d):
        return ParsedRequest(d)
    return RetrieveRequest.model_validate_json(body)


def _ids(v: Any) -> bool:
    if type(v) is not list or len(v) > MAX_LIST:
        return False
    return all(type(s) is str and 0 < len(s) <= _ID_MAX for s in v)


def _number(v: Any) -> bool:
    t = type(v)
    return (t is float and abs(v) < _BIG) or (t is int and abs(v) < 2**53)


def _plain(v: Any, depth: int = 0) -> bool:
    """A JSON value both decoders read identically (bounded nesting, no >64-bit numbers)."""
    t = type(v)
    if t is dict:
        return depth < _MAX_DEPTH and all(_plain(x, depth + 1) for x in v.values())
    if t is list:
        return depth < _MAX_DEPTH and all(_plain(x, depth + 1) for x in v)
    if t is float:
        return abs(v) < _BIG
    return True  # str, int (orjson's ints fit 64 bits), bool, None


def _simple(d: dict) -> bool:
    """Every field present has exactly the type and bounds the model declares."""
    if not _KNOWN.issuperset(d):
        return False
    v = d.get("user_id")
    if v is not None and (type(v) is not str or not 0 < len(v) <= _ID_MAX):
        return False
    v = d.get("history")
    if v is not None and not _ids(v):
        return False
    if "exclude" in d and not _ids(d["exclude"]):
        return False
    v = d.get("k")
    if v is not None and (type(v) is not int or abs(v) >= 2**63):
        return False
    v = d.get("scenario")
    if v is not None and type(v) is not str:
        return False
    v = d.get("weights")
    if v is not None:
        t = type(v)
        if t is dict:
            if not all(map(_number, v.values())):
                return False
            d["weights"] = {name: float(x) for name, x in v.items()}
        elif t is list:
            if not all(map(_number, v)):
                return False
            d["weights"] = [float(x) for x in v]
        else:
            return False
    for flag in ("exclude_seen", "explain"):
        if flag in d and type(d[flag]) is not bool:
            return False
    v = d.get("filter")
    return v is None or (type(v) is dict and _plain(v, 1))
