"""The attribute-filter language of POST /v1/retrieve (``filter``), typed and validated.

A filter is JSON over the item columns the bundle declares filterable (``manifest.attributes``):

    {"field": "genre", "eq": "drama"}                       equality (string, number or bool)
    {"field": "genre", "in": ["drama", "comedy"]}           membership
    {"field": "price", "gte": 10, "lt": 50}                 numeric range (gt / gte / lt / lte)
    {"and": [F, ...]}   {"or": [F, ...]}   {"not": F}       composition

:func:`parse_filter` turns it into a small AST, checking every field name and value type against
the declared columns and raising :class:`FilterError` with the path of the bad part
(``filter.and.1.field``) and what was expected. The AST evaluates to a bitmap over the item table
(:class:`ItemAttributes`, for FAISS ID selectors) or renders as a Milvus boolean expression.
A null attribute value never matches, under ``not`` neither (SQL's three-valued logic, which is
what Milvus does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from csmf.errors import CsmfError

MAX_NODES = 64  # conditions + connectives in one filter
MAX_DEPTH = 8
MAX_IN = 1024  # values in one `in` list
RANGE_OPS = ("gt", "gte", "lt", "lte")
ATTRIBUTE_TYPES = ("string", "number", "bool")


class FilterError(CsmfError, ValueError):
    """A filter is malformed or names an unknown field; ``loc`` is the path of the bad part."""

    def __init__(self, loc: tuple, msg: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc = loc
        self.msg = msg


# -- the AST --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Eq:
    field: str
    value: str | float | bool


@dataclass(frozen=True, slots=True)
class In:
    field: str
    values: tuple


@dataclass(frozen=True, slots=True)
class Range:
    field: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Or:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Not:
    part: Filter


Filter = Eq | In | Range | And | Or | Not


# -- parsing --------------------------------------------------------------------------------------


def parse_filter(obj: Any, schema: Mapping[str, str], loc: tuple = ("filter",)) -> Filter:
    """The AST of a JSON filter, validated against ``schema`` (column → string/number/bool)."""
    budget = [MAX_NODES]
    return _parse(obj, schema, loc, 0, budget)


def _parse(obj: Any, schema: Mapping[str, str], loc: tuple, depth: int, budget: list) -> Filter:
    if depth > MAX_DEPTH:
        raise FilterError(loc, f"filters nest at most {MAX_DEPTH} levels deep")
    budget[0] -= 1
    if budget[0] < 0:
        raise FilterError(loc, f"a filter has at most {MAX_NODES} conditions and connectives")
    if not isinstance(obj, dict):
        raise FilterError(loc, f"a filter is a JSON object, got {_show(obj)}")
    forms = [k for k in ("field", "and", "or", "not") if k in obj]
    if len(forms) != 1:
        raise FilterError(
            loc,
            'a filter is one of {"field": ..., "eq" | "in" | "gt"/"gte"/"lt"/"lte": ...}, '
            f'{{"and": [...]}}, {{"or": [...]}}, {{"not": {{...}}}}; got keys {sorted(obj)}',
        )
    form = forms[0]
    if form in ("and", "or"):
        _only(obj, {form}, loc)
        parts = obj[form]
        if not isinstance(parts, list) or not parts:
            raise FilterError(
                loc + (form,), f"expected a non-empty list of filters, got {_show(parts)}"
            )
        out = tuple(
            _parse(p, schema, loc + (form, i), depth + 1, budget) for i, p in enumerate(parts)
        )
        return And(out) if form == "and" else Or(out)
    if form == "not":
        _only(obj, {"not"}, loc)
        return Not(_parse(obj["not"], schema, loc + ("not",), depth + 1, budget))
    return _condition(obj, schema, loc)


def _condition(obj: dict, schema: Mapping[str, str], loc: tuple) -> Filter:
    name = obj["field"]
    if not isinstance(name, str) or name not in schema:
        known = sorted(schema) or "none: the bundle declares no filterable columns"
        raise FilterError(
            loc + ("field",), f"unknown filter field {_show(name)}; filterable: {known}"
        )
    kind = schema[name]
    ops = [k for k in obj if k != "field"]
    if "eq" in obj:
        _only(obj, {"field", "eq"}, loc)
        return Eq(name, _value(obj["eq"], kind, name, loc + ("eq",)))
    if "in" in obj:
        _only(obj, {"field", "in"}, loc)
        vals = obj["in"]
        if not isinstance(vals, list) or not vals or len(vals) > MAX_IN:
            raise FilterError(
                loc + ("in",), f"expected a list of 1..{MAX_IN} values, got {_show(vals)}"
            )
        return In(name, tuple(_value(v, kind, name, loc + ("in", i)) for i, v in enumerate(vals)))
    bounds = {k: obj[k] for k in RANGE_OPS if k in obj}
    if not bounds or set(ops) - set(RANGE_OPS):
        raise FilterError(
            loc, f"a condition on {name!r} needs one of eq, in, gt, gte, lt, lte; got keys {ops}"
        )
    if kind != "number":
        raise FilterError(
            loc + (next(iter(bounds)),), f"range operators need a number field, {name!r} is {kind}"
        )
    if ("gt" in bounds and "gte" in bounds) or ("lt" in bounds and "lte" in bounds):
        raise FilterError(loc, "give at most one lower (gt/gte) and one upper (lt/lte) bound")
    return Range(name, **{k: _value(v, "number", name, loc + (k,)) for k, v in bounds.items()})


def _value(v: Any, kind: str, name: str, loc: tuple) -> str | float | bool:
    if kind == "string" and isinstance(v, str):
        return v
    if kind == "bool" and isinstance(v, bool):
        return v
    if kind == "number" and isinstance(v, int | float) and not isinstance(v, bool):
        if not math.isfinite(v):
            raise FilterError(loc, f"expected a finite number for {name!r}, got {v!r}")
        return float(v)
    raise FilterError(loc, f"{name!r} is a {kind} field, got {_show(v)}")


def _only(obj: dict, allowed: set, loc: tuple) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise FilterError(
            loc + (extra[0],), f"unexpected key {extra[0]!r} (allowed: {sorted(allowed)})"
        )


def _show(v: Any) -> str:
    text = (
        json.dumps(v) if isinstance(v, str | int | float | bool | list | dict | None) else repr(v)
    )
    return text if len(text) <= 60 else text[:57] + "..."


def filter_key(obj: Any) -> str:
    """A canonical string for caching compiled filters (key order does not matter)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# -- evaluation over the item table ---------------------------------------------------------------


class ItemAttributes:
    """The filterable columns of the item table, row-aligned with the index, as numpy arrays:
    strings dictionary-coded (int32, -1 = null), numbers float64 (NaN = null), bools int8
    (-1 = null). ``mask(filter)`` is a handful of vectorised comparisons over N rows."""

    def __init__(self, columns: Mapping[str, tuple[str, np.ndarray, dict]], n: int) -> None:
        self._cols = dict(columns)  # name → (type, values, vocabulary for strings)
        self.n = n
        self.schema = {name: t for name, (t, _, _) in self._cols.items()}

    @classmethod
    def from_table(cls, table: pa.Table, schema: Mapping[str, str]) -> ItemAttributes:
        cols = {}
        for name, kind in schema.items():
            col = table.column(name).combine_chunks()
            if kind == "string":
                enc = pc.cast(col, pa.string()).dictionary_encode()
                codes = enc.indices.to_numpy(zero_copy_only=False)
                codes = np.where(np.isnan(codes), -1, codes) if codes.dtype.kind == "f" else codes
                vocab = {v: i for i, v in enumerate(enc.dictionary.to_pylist())}
                cols[name] = (kind, np.asarray(codes, np.int64).astype(np.int32), vocab)
            elif kind == "number":
                vals = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
                cols[name] = (kind, np.asarray(vals, np.float64), {})
            else:
                vals = pc.fill_null(pc.cast(pc.cast(col, pa.bool_()), pa.int8()), -1)
                cols[name] = (kind, vals.to_numpy(zero_copy_only=False).astype(np.int8), {})
        return cls(cols, table.num_rows)

    def with_rows(self, rows: np.ndarray, values: Mapping[str, Sequence[Any]]) -> ItemAttributes:
        """A copy with ``rows`` (n,) set to ``values`` (column → n raw values, already checked
        against the types; a missing column or None is null), grown to cover every row. The
        service swaps the copy in, so a mask never mixes columns of two lengths."""
        n = max(self.n, int(rows.max()) + 1 if len(rows) else 0)
        cols = {}
        for name, (kind, vals, vocab) in self._cols.items():
            null = {"string": -1, "number": np.nan, "bool": -1}[kind]
            out = np.full(n, null, vals.dtype)
            out[: self.n] = vals
            raw = values.get(name)
            if raw is None:
                out[rows] = null
            elif kind == "string":
                vocab = dict(vocab)
                out[rows] = [-1 if v is None else vocab.setdefault(str(v), len(vocab)) for v in raw]
            elif kind == "number":
                out[rows] = [np.nan if v is None else float(v) for v in raw]
            else:
                out[rows] = [-1 if v is None else int(bool(v)) for v in raw]
            cols[name] = (kind, out, vocab)
        return ItemAttributes(cols, n)

    def values(self, name: str, rows: np.ndarray) -> list:
        """Raw values of column ``name`` at ``rows`` (None for null), as they were written."""
        kind, vals, vocab = self._cols[name]
        v = vals[rows]
        if kind == "string":
            words = np.empty(len(vocab) + 1, object)  # code -1 (null) reads the last slot
            for w, c in vocab.items():
                words[c] = w
            return words[v].tolist()
        if kind == "number":
            return [None if math.isnan(x) else x for x in v.tolist()]
        return [None if x < 0 else bool(x) for x in v.tolist()]

    def mask(self, f: Filter) -> np.ndarray:
        """(N,) bool: rows the filter allows (where it is true; see :meth:`_eval`)."""
        return self._eval(f)[0]

    def _eval(self, f: Filter) -> tuple[np.ndarray, np.ndarray]:
        """(true, false) masks under SQL's three-valued logic, as Milvus evaluates expressions:
        a condition on a null value is unknown — neither true nor false — and ``not`` keeps it
        unknown, so a null never matches (``not`` included)."""
        if isinstance(f, And | Or):
            t, fa = self._eval(f.parts[0])
            for p in f.parts[1:]:
                pt, pf = self._eval(p)
                if isinstance(f, And):
                    t, fa = t & pt, fa | pf
                else:
                    t, fa = t | pt, fa & pf
            return t, fa
        if isinstance(f, Not):
            t, fa = self._eval(f.part)
            return fa, t
        kind, vals, vocab = self._cols[f.field]
        known = ~np.isnan(vals) if kind == "number" else vals >= 0  # (N,) non-null
        if isinstance(f, Range):
            cond = np.ones(self.n, bool)
            for op, b in (("gt", f.gt), ("gte", f.gte), ("lt", f.lt), ("lte", f.lte)):
                if b is not None:
                    cond &= _CMP[op](vals, b)
        else:
            want = (f.value,) if isinstance(f, Eq) else f.values
            if kind == "string":
                codes = np.asarray([vocab[v] for v in want if v in vocab], np.int32)
                cond = np.isin(vals, codes)
            elif kind == "bool":
                cond = np.isin(vals, np.asarray([int(v) for v in want], np.int8))
            else:
                cond = np.isin(vals, np.asarray(want, np.float64))
        return cond & known, ~cond & known


_CMP = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}


NULL_FLAG = "__null"  # suffix of the flag field that marks a null where fields cannot be null


def to_expr(f: Filter, null_flags: frozenset[str] | set[str] = frozenset()) -> str:
    """The filter as a Milvus boolean expression over fields of the same names.

    ``null_flags``: fields stored with a placeholder for null and a ``<field>__null`` bool flag
    (Milvus before 2.5 has no nullable fields). Their comparisons are guarded by the flag, with
    every ``not`` pushed down to the comparisons first (De Morgan), so a null never matches,
    under ``not`` neither — the same three-valued answer as a nullable field."""
    if null_flags:
        return _guarded(f, False, null_flags)
    if isinstance(f, And | Or):
        op = " and " if isinstance(f, And) else " or "
        return op.join(f"({to_expr(p)})" for p in f.parts)
    if isinstance(f, Not):
        return f"not ({to_expr(f.part)})"
    return _condition_expr(f)


def _guarded(f: Filter, negate: bool, null_flags: frozenset[str] | set[str]) -> str:
    if isinstance(f, Not):
        return _guarded(f.part, not negate, null_flags)
    if isinstance(f, And | Or):
        conj = isinstance(f, And) != negate  # not (a and b) = (not a) or (not b)
        op = " and " if conj else " or "
        return op.join(f"({_guarded(p, negate, null_flags)})" for p in f.parts)
    expr = _condition_expr(f)
    if negate:
        expr = f"not ({expr})"
    if f.field in null_flags:
        expr = f"{f.field}{NULL_FLAG} == false and ({expr})"
    return expr


def _condition_expr(f: Eq | In | Range) -> str:
    if isinstance(f, Range):
        sym = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
        conds = [
            f"{f.field} {sym[op]} {getattr(f, op)!r}"
            for op in RANGE_OPS
            if getattr(f, op) is not None
        ]
        return " and ".join(conds)
    if isinstance(f, Eq):
        return f"{f.field} == {_literal(f.value)}"
    return f"{f.field} in [{', '.join(_literal(v) for v in f.values)}]"


def _literal(v: str | float | bool) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(float(v))


def column_type(t: pa.DataType) -> str | None:
    """The filter type of an Arrow column, or None if it cannot be filtered (lists, structs)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return None


__all__ = [
    "NULL_FLAG", "And", "Eq", "Filter", "FilterError", "In", "ItemAttributes", "Not", "Or", "Range",
    "column_type", "filter_key", "parse_filter", "to_expr",
]  # fmt: skip
