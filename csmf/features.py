"""Feature spec, vocabularies and row encoding shared by the trainer, the builder and the service.

The spec lives in the training config (``[features]``), not in code. Encoding is plain numpy so the
service can encode a user without torch autograd machinery.

Index conventions for every vocabulary: 0 = padding (multi-hot/history slots that hold nothing),
1 = unknown value (out of vocabulary / missing), 2.. = values seen in training data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from csmf.errors import ConfigError, FeatureError

PAD, UNK = 0, 1
Kind = Literal["categorical", "numeric", "multi_hot"]
KINDS: tuple[str, ...] = ("categorical", "numeric", "multi_hot")


@dataclass(frozen=True)
class FieldSpec:
    """One feature column of the users or items table."""

    name: str
    kind: Kind
    dim: int = 8  # embedding columns (ignored for numeric)
    max_len: int = 8  # multi-hot: values kept per row

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        if self.dim < 1 or self.max_len < 1:
            raise ConfigError(
                f"feature {self.name!r}: dim and max_len must be >= 1, got {self.dim}, {self.max_len}"
            )


@dataclass(frozen=True)
class HistorySpec:
    """User behaviour history: the item ids of the user's earlier events, pooled on the user side."""

    max_len: int = 50
    dim: int = 32
    source: Literal["exposure", "click"] = "exposure"  # which events count as history

    def __post_init__(self) -> None:
        if self.max_len < 1 or self.dim < 1:
            raise ConfigError(
                f"history: max_len and dim must be >= 1, got {self.max_len}, {self.dim}"
            )
        if self.source not in ("exposure", "click"):
            raise ConfigError(f"history.source must be 'exposure' or 'click', got {self.source!r}")


@dataclass(frozen=True)
class TowerSpec:
    id_column: str
    id_dim: int = 32
    fields: tuple[FieldSpec, ...] = ()
    history: HistorySpec | None = None

    def of_kind(self, kind: str) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind == kind)


@dataclass(frozen=True)
class FeatureSpec:
    user: TowerSpec = field(default_factory=lambda: TowerSpec("user_id"))
    item: TowerSpec = field(default_factory=lambda: TowerSpec("item_id"))
    display: tuple[str, ...] = ()  # item columns returned to clients (e.g. title)

    def __post_init__(self) -> None:
        if self.item.history is not None:
            raise ConfigError("features.item.history is not supported: history is a user feature")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        """Build from the ``[features]`` table of a config file (see configs/*.toml)."""
        unknown = set(d) - {"user", "item", "display"}
        if unknown:
            raise ConfigError(
                f"features: unknown keys {sorted(unknown)}; expected user, item, display"
            )
        return cls(
            user=_tower_from_dict(d.get("user", {}), "user_id", "user"),
            item=_tower_from_dict(d.get("item", {}), "item_id", "item"),
            display=tuple(d.get("display", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tower_from_dict(d: Mapping[str, Any], default_id: str, side: str) -> TowerSpec:
    known = {"id_column", "id_dim", "fields", "history"}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(
            f"features.{side}: unknown keys {sorted(unknown)}; expected {sorted(known)}"
        )
    fields = []
    for raw in d.get("fields", ()):
        try:
            fields.append(FieldSpec(**raw))
        except TypeError as exc:
            raise ConfigError(f"features.{side}.fields: bad entry {raw!r}: {exc}") from None
    hist = d.get("history")
    return TowerSpec(
        id_column=d.get("id_column", default_id),
        id_dim=int(d.get("id_dim", 32)),
        fields=tuple(fields),
        history=HistorySpec(**hist) if hist else None,
    )


class Vocab:
    """Maps raw values (stored as strings) to indices >= 2; anything else encodes to UNK.

    Vocabularies fitted on arrow columns keep their values as one arrow string array (10M user
    ids: ~100 MB instead of ~650 MB of Python strings); ``values`` then builds the list on each
    access — use :attr:`size`, :meth:`arrow_values` or :meth:`encode_arrow` on hot paths. The
    value → index dict is built on first :meth:`lookup` (the training path never needs it)."""

    def __init__(self, values: Sequence[str] | Any) -> None:
        if hasattr(values, "type"):  # an arrow string array
            self._list, self._value_set = None, values
        else:
            self._list, self._value_set = list(values), None
        self._index: dict[str, int] | None = None

    @property
    def values(self) -> list[str]:
        return self._list if self._list is not None else self._value_set.to_pylist()

    @property
    def size(self) -> int:
        """Number of values (table rows minus PAD and UNK)."""
        return len(self._list) if self._list is not None else len(self._value_set)

    def __len__(self) -> int:  # rows of the embedding table, PAD and UNK included
        return self.size + 2

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.values == other.values

    def __repr__(self) -> str:
        return f"Vocab({self.size} values)"

    @property
    def index(self) -> dict[str, int]:
        """value → index (>= 2), built once."""
        if self._index is None:
            self._index = {v: i + 2 for i, v in enumerate(self.values)}
        return self._index

    @classmethod
    def fit(cls, values: Iterable[Any]) -> Vocab:
        if _arrow_encodable(values):
            return cls.fit_arrow(values)
        return cls(sorted({str(v) for v in values if v is not None}))

    @classmethod
    def fit_arrow(cls, column: Any) -> Vocab:
        """:meth:`fit` of a string or integer arrow column, vectorised: the distinct values as
        strings, sorted by code point (UTF-8 byte order is code point order: Python's order)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        distinct = pc.unique(pc.cast(column, pa.string())).drop_null()
        if isinstance(distinct, pa.ChunkedArray):
            distinct = distinct.combine_chunks()
        return cls(distinct.take(pc.sort_indices(distinct)))

    def extended(self, values: Iterable[Any]) -> Vocab:
        """This vocabulary plus the ``values`` it lacks, appended in sorted order: every existing
        value keeps its index, so a grown embedding table keeps every existing row (warm start)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        seen = Vocab.fit(values).arrow_values()
        fresh = pc.filter(seen, pc.invert(pc.is_in(seen, value_set=self.arrow_values())))
        if len(fresh) == 0:
            return self
        return Vocab(pa.concat_arrays([self.arrow_values(), fresh.cast(pa.string())]))

    def lookup(self, value: Any) -> int:
        return UNK if value is None else self.index.get(str(value), UNK)

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        if _arrow_encodable(values):
            return self.encode_arrow(values)
        return np.fromiter((self.lookup(v) for v in values), dtype=np.int64, count=len(values))

    def arrow_values(self) -> Any:
        """The values as one arrow string array (built once for a list-backed vocabulary)."""
        if self._value_set is None:
            import pyarrow as pa

            self._value_set = pa.array(self.values, pa.string())
        return self._value_set

    def encode_arrow(self, column: Any) -> np.ndarray:
        """:meth:`encode` of a string or integer arrow column, vectorised (arrow's hash lookup
        against the values, no Python object per row)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        idx = pc.index_in(pc.cast(column, pa.string()), value_set=self.arrow_values())
        out = np.asarray(idx.fill_null(UNK - 2).to_numpy(zero_copy_only=False), np.int64)
        return out + 2


def _arrow_encodable(values: Any) -> bool:
    """An arrow array of strings or integers (whose ``str`` is arrow's cast to string)."""
    t = getattr(values, "type", None)
    if t is None or not hasattr(values, "cast"):
        return False
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


@dataclass
class NumericStats:
    mean: float
    std: float

    @classmethod
    def fit(cls, values: np.ndarray) -> NumericStats:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(0.0, 1.0)
        std = float(v.std())
        return cls(float(v.mean()), std if std > 1e-12 else 1.0)


@dataclass
class TowerVocab:
    """Everything needed to turn one tower's raw rows into model inputs."""

    ids: Vocab
    categorical: dict[str, Vocab] = field(default_factory=dict)
    multi_hot: dict[str, Vocab] = field(default_factory=dict)
    numeric: dict[str, NumericStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": self.ids.values,
            "categorical": {k: v.values for k, v in self.categorical.items()},
            "multi_hot": {k: v.values for k, v in self.multi_hot.items()},
            "numeric": {k: [s.mean, s.std] for k, s in self.numeric.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TowerVocab:
        return cls(
            ids=Vocab(list(d["ids"])),
            categorical={k: Vocab(list(v)) for k, v in d["categorical"].items()},
            multi_hot={k: Vocab(list(v)) for k, v in d["multi_hot"].items()},
            numeric={k: NumericStats(*v) for k, v in d["numeric"].items()},
        )

    def extended(self, spec: TowerSpec, columns: Mapping[str, Sequence[Any]]) -> TowerVocab:
        """Grown by the ids and categories of a newer users or items table (:meth:`Vocab.extended`:
        existing indices unchanged). Numeric statistics stay: the model learned on that scale."""
        grown = TowerVocab(self.ids.extended(columns[spec.id_column]), numeric=dict(self.numeric))
        for f in spec.fields:
            col = columns.get(f.name)
            if f.kind == "categorical":
                old = self.categorical[f.name]
                grown.categorical[f.name] = old if col is None else old.extended(col)
            elif f.kind == "multi_hot":
                old = self.multi_hot[f.name]
                grown.multi_hot[f.name] = old if col is None else old.extended(_flatten(col))
        return grown

    def sizes(self) -> dict[str, int]:
        """Embedding-table row counts by input name, as the towers need them."""
        out = {"id": len(self.ids)}
        out.update({f"cat:{k}": len(v) for k, v in self.categorical.items()})
        out.update({f"multi:{k}": len(v) for k, v in self.multi_hot.items()})
        return out


def fit_tower_vocab(spec: TowerSpec, columns: Mapping[str, Sequence[Any]]) -> TowerVocab:
    """Fit vocabularies/statistics on the rows of a users or items table. Columns are Python
    sequences or arrow arrays (vectorised: no Python object per row for 10M users)."""
    tv = TowerVocab(ids=Vocab.fit(columns[spec.id_column]))
    for f in spec.fields:
        col = columns[f.name]
        if f.kind == "categorical":
            tv.categorical[f.name] = Vocab.fit(col)
        elif f.kind == "multi_hot":
            tv.multi_hot[f.name] = Vocab.fit(_flatten(col))
        else:
            tv.numeric[f.name] = NumericStats.fit(_floats(col))
    return tv


def _flatten(col: Any) -> Any:
    """A multi-hot column's values: an arrow list column flattened, or a Python iterator."""
    if hasattr(col, "type"):  # arrow list column
        import pyarrow.compute as pc

        return pc.list_flatten(col)
    return (v for row in col if row is not None for v in row)


def _floats(col: Any) -> np.ndarray:
    """A numeric column as float64, missing values NaN (arrow arrays without a Python loop)."""
    if hasattr(col, "type"):
        import pyarrow as pa
        import pyarrow.compute as pc

        return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    return np.asarray([np.nan if v is None else v for v in col], dtype=np.float64)


NUMERIC_CLIP = 1e4  # standardised numeric inputs are clipped to ±this many standard deviations


def encode_rows(
    spec: TowerSpec,
    vocab: TowerVocab,
    columns: Mapping[str, Sequence[Any]],
    histories: Sequence[Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Encode ``n`` raw rows into the model's input arrays.

    ``columns`` maps column name → sequence of n raw values (missing feature columns encode as
    UNK / 0.0). ``histories`` (user side) holds n sequences of *encoded item indices*, most recent
    last; the last ``spec.history.max_len`` are kept.

    Returns ``{"id": (n,), "cat:<f>": (n,), "multi:<f>": (n, L), "num": (n, F), "history": (n, H)}``.
    """
    ids = columns[spec.id_column]
    n = len(ids)
    out: dict[str, np.ndarray] = {"id": vocab.ids.encode(ids)}
    for f in spec.of_kind("categorical"):
        col = columns.get(f.name)
        out[f"cat:{f.name}"] = (
            vocab.categorical[f.name].encode(col) if col is not None else np.full(n, UNK, np.int64)
        )
    for f in spec.of_kind("multi_hot"):
        col = columns.get(f.name)
        if hasattr(col, "to_pylist"):
            col = col.to_pylist()
        out[f"multi:{f.name}"] = _pad(
            [[vocab.multi_hot[f.name].lookup(v) for v in (row or ())] for row in col]
            if col is not None
            else [[] for _ in range(n)],
            f.max_len,
        )
    numeric = spec.of_kind("numeric")
    if numeric:
        num = np.zeros((n, len(numeric)), np.float32)
        for j, f in enumerate(numeric):
            col = columns.get(f.name)
            if col is None:
                continue
            s = vocab.numeric[f.name]
            x = _floats(col)
            x = np.where(np.isfinite(x), (x - s.mean) / s.std, 0.0)  # missing → the mean
            # An absurd value (1e308 from a live feature store) would overflow float32 and turn
            # the user vector, and every score, into inf/NaN: clip far outside any real tail.
            num[:, j] = np.clip(x, -NUMERIC_CLIP, NUMERIC_CLIP)
        out["num"] = num
    if spec.history is not None:
        hs = histories if histories is not None else [[] for _ in range(n)]
        if len(hs) != n:
            raise FeatureError(f"got {len(hs)} histories for {n} rows")
        out["history"] = _pad(hs, spec.history.max_len)
    return out


def _pad(rows: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Right-align the last ``max_len`` entries of each row into a PAD-filled matrix."""
    out = np.zeros((len(rows), max_len), np.int64)
    for i, r in enumerate(rows):
        if len(r) > max_len:
            r = r[len(r) - max_len :]
        if len(r):
            out[i, max_len - len(r) :] = r
    return out
