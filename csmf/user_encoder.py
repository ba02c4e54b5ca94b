"""The user tower as plain numpy, for serving (~11 µs per user vs ~38 µs torch eager;
docs/design.md#performance-facts).

Built by the index builder from a trained :class:`csmf.towers.Tower`: disallowed connections are
zeroed in storage (so no masks at serving) and the final layer's outputs are permuted like the item
vectors in the index, so slices come out contiguous in cascade order. Saved as one ``.npz`` (no
pickle) holding the weights and a JSON blob with the tower spec and vocabularies.

No torch import here: the service encodes users with numpy alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from csmf.errors import BundleError, FeatureError
from csmf.features import (
    NUMERIC_CLIP,
    UNK,
    FeatureSpec,
    TowerSpec,
    TowerVocab,
    Vocab,
    encode_rows,
)

USER_ENCODER_FORMAT = 1
ACTIVATIONS = ("relu", "silu")


class HistoryTable:
    """The distinct item ids of a set of stored histories, each resolved once against an
    encoder's item vocabulary (``vocab_index``) and the index (``rows``, -1 = not in the index).

    Stored histories then reach the encoder as :class:`CodedHistory` and encode with one numpy
    gather, instead of a string conversion and a dict lookup per item on every request.
    """

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        self.vocab_index: np.ndarray | None = None  # (C,) intp
        self.rows: np.ndarray | None = None  # (C,) int64

    def resolve(self, item_index: Mapping[str, int], item_rows: Mapping[str, int]) -> None:
        self.vocab_index = np.array([item_index.get(i, UNK) for i in self.ids], dtype=np.intp)
        self.rows = np.array([item_rows.get(i, -1) for i in self.ids], dtype=np.int64)


class CodedHistory(Sequence[str]):
    """One stored history (external item ids, oldest → newest) as codes into a HistoryTable.
    It reads like a list of ids; ``vocab_index()`` and ``rows()`` are numpy gathers."""

    __slots__ = ("codes", "table")

    def __init__(self, codes: np.ndarray, table: HistoryTable) -> None:
        self.codes = codes  # (L,) int32 into table.ids
        self.table = table

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.table.ids[c] for c in self.codes[i].tolist()]
        return self.table.ids[int(self.codes[i])]

    def __iter__(self):
        return iter(self[:])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CodedHistory | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"CodedHistory({self[:]!r})"

    @property
    def resolved(self) -> bool:
        return self.table.vocab_index is not None

    def vocab_index(self, last: int) -> np.ndarray:
        """Indexes into the encoder's item vocabulary of the last ``last`` items (UNK if absent)."""
        return self.table.vocab_index[self.codes[-last:]] if last else self.table.vocab_index[:0]

    def rows(self) -> np.ndarray:
        """Index rows of the items that are in the index."""
        r = self.table.rows[self.codes]
        return r[r >= 0]


class UserEncoder:
    """Raw user features + history (external item ids) → permuted user vectors, (n, D) float32."""

    def __init__(
        self,
        spec: TowerSpec,
        vocab: TowerVocab,
        item_vocab: Vocab,
        inputs: Sequence[str],
        tables: Sequence[np.ndarray],
        layers: Sequence[tuple[np.ndarray, np.ndarray]],
        activation: str,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise BundleError(
                f"user encoder activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if len(inputs) != len(tables):
            raise BundleError(f"user encoder has {len(inputs)} inputs but {len(tables)} tables")
        if not layers:
            raise BundleError("user encoder has no layers")
        self.spec = spec
        self.vocab = vocab
        self.item_vocab = item_vocab
        self.inputs = tuple(inputs)
        self.tables = [np.ascontiguousarray(t, dtype=np.float32) for t in tables]  # (rows, D_n)
        # (in, out) so that x @ W needs no transpose on the hot path
        self.layers = [
            (np.ascontiguousarray(w, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32))
            for w, b in layers
        ]
        self.activation = activation
        self.num_numeric = len(spec.of_kind("numeric"))
        self.dim = int(self.layers[-1][0].shape[1])
        self._check_shapes()
        self._plan = self._one_row_plan()

    def _check_shapes(self) -> None:
        width = sum(t.shape[1] for t in self.tables) + self.num_numeric
        for i, (w, b) in enumerate(self.layers):
            if w.shape[0] != width or b.shape != (w.shape[1],):
                raise BundleError(
                    f"user encoder layer {i}: weight {w.shape} / bias {b.shape} do not fit input width {width}"
                )
            width = w.shape[1]
        if "history" in self.inputs:
            rows = self.tables[self.inputs.index("history")].shape[0]
            if rows != len(self.item_vocab):
                raise BundleError(
                    f"user encoder history table has {rows} rows, item vocabulary has {len(self.item_vocab)}"
                )

    def _one_row_plan(self) -> list[tuple]:
        """Per input slot of the first layer: how to fill it from one raw row (the fast path)."""
        kinds = {f"cat:{f.name}": f for f in self.spec.of_kind("categorical")}
        multis = {f"multi:{f.name}": f for f in self.spec.of_kind("multi_hot")}
        plan, lo = [], 0
        for name, table in zip(self.inputs, self.tables, strict=True):
            hi = lo + table.shape[1]
            if name == "id":
                plan.append(("one", self.spec.id_column, table, self.vocab.ids.index, 0, lo, hi))
            elif name in kinds:
                f = kinds[name]
                plan.append(("one", f.name, table, self.vocab.categorical[f.name].index, 0, lo, hi))
            elif name in multis:
                f = multis[name]
                index = self.vocab.multi_hot[f.name].index
                plan.append(("many", f.name, table, index, f.max_len, lo, hi))
            else:  # history
                plan.append(("history", None, table, self.item_vocab.index, 0, lo, hi))
            lo = hi
        for f in self.spec.of_kind("numeric"):
            s = self.vocab.numeric[f.name]
            plan.append(("num", f.name, None, None, (s.mean, s.std), lo, lo + 1))
            lo += 1
        return plan

    # -- encoding ---------------------------------------------------------------------------------

    def encode_inputs(
        self, rows: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[str]] | None = None
    ) -> dict[str, np.ndarray]:
        """Raw rows (feature name → value) + histories (external item ids, oldest → newest) →
        the model's index/number arrays. Missing features and unknown ids encode as UNK; unknown
        history items as UNK too (what :meth:`Vocab.encode` does for every vocabulary)."""
        n = len(rows)
        names = [self.spec.id_column, *(f.name for f in self.spec.fields)]
        columns = {name: [r.get(name) for r in rows] for name in names}
        hist = None
        if self.spec.history is not None:
            if histories is None:
                histories = [()] * n
            elif len(histories) != n:
                raise BundleError(f"got {len(histories)} histories for {n} rows")
            keep = self.spec.history.max_len
            hist = [self._history_index(hs, keep) for hs in histories]
        return encode_rows(self.spec, self.vocab, columns, hist)

    def encode(
        self, rows: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[str]] | None = None
    ) -> np.ndarray:
        """(n, D) float32 user vectors. ``rows[i]`` holds raw features (may be empty: an unknown
        user with no history gets the cold-start vector — every input UNK/PAD)."""
        if len(rows) == 1:  # the serving hot path: no per-column arrays, straight into layer 1
            if histories is not None and len(histories) != 1:
                raise BundleError(f"got {len(histories)} histories for 1 row")
            history = histories[0] if histories is not None else ()
            return self._mlp(self._first_input(rows[0], history))
        return self.forward(self.encode_inputs(rows, histories))

    def _first_input(self, row: Mapping[str, Any], history: Sequence[str]) -> np.ndarray:
        """One raw row → (1, in) first-layer input; same values as encode_rows + forward."""
        x = np.zeros((1, self._plan[-1][-1]), np.float32)
        for kind, key, table, index, extra, lo, hi in self._plan:
            if kind == "one":
                v = row.get(key)
                x[0, lo:hi] = table[UNK if v is None else index.get(str(v), UNK)]
            elif kind == "num":
                v = row.get(key)
                if v is not None:
                    try:
                        v = float(v)
                    except (TypeError, ValueError):
                        raise FeatureError(f"feature {key!r} must be a number, got {v!r}") from None
                    if math.isfinite(v):  # missing / NaN → the mean, as encode_rows does
                        z = (v - extra[0]) / extra[1]  # clipped as encode_rows does
                        x[0, lo] = min(max(z, -NUMERIC_CLIP), NUMERIC_CLIP)
            else:
                if kind == "many":
                    values = list(row.get(key) or ())[-extra:]
                    idx = [UNK if v is None else index.get(str(v), UNK) for v in values]
                else:
                    idx = self._history_index(history, self.spec.history.max_len)
                if len(idx):  # masked mean over non-padding slots (every looked-up index is >= 1)
                    rows = table.take(np.asarray(idx, dtype=np.intp), axis=0)  # (L, D_n)
                    x[0, lo:hi] = np.add.reduce(rows, axis=0) / len(idx)
        return x

    def _history_index(self, history: Sequence[str], keep: int) -> list[int] | np.ndarray:
        """The last ``keep`` items as item-vocabulary indexes (unknown ids → UNK)."""
        if isinstance(history, CodedHistory) and history.resolved:
            return history.vocab_index(keep)
        index = self.item_vocab.index  # one dict lookup per item
        return [index.get(str(h), UNK) for h in list(history)[-keep:]] if keep else []

    def cold_start(self) -> np.ndarray:
        """(D,) the vector of a user with no id, no features and no history."""
        return self.encode([{}], [()])[0]

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Encoded inputs (as :func:`csmf.features.encode_rows` returns them) → (n, D)."""
        parts = []
        for name, table in zip(self.inputs, self.tables, strict=True):
            idx = inputs[name]
            if idx.ndim == 1:
                parts.append(table[idx])  # (n, D_n)
            else:  # masked mean over non-padding slots, as OwnedEmbedding does
                mask = (idx > 0).astype(np.float32)  # (n, L)
                summed = np.matmul(mask[:, None, :], table[idx])[:, 0]  # (n, D_n)
                parts.append(summed / np.maximum(mask.sum(1, keepdims=True), 1.0))
        if self.num_numeric:
            parts.append(inputs["num"].astype(np.float32, copy=False))
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # (n, in)
        return self._mlp(x)

    def _mlp(self, x: np.ndarray) -> np.ndarray:
        """(n, in) first-layer input → (n, D)."""
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = x @ w
            x += b
            if i < last:
                x = self._act(x)
        return x  # (n, D)

    def _act(self, x: np.ndarray) -> np.ndarray:
        if self.activation == "relu":
            return np.maximum(x, 0.0, out=x)
        return x * (0.5 * (1.0 + np.tanh(0.5 * x)))  # x * sigmoid(x) without exp overflow

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {
            "format": USER_ENCODER_FORMAT,
            "spec": asdict(self.spec),
            "vocab": self.vocab.to_dict(),
            "item_ids": self.item_vocab.values,
            "inputs": list(self.inputs),
            "activation": self.activation,
            "num_layers": len(self.layers),
        }
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        arrays.update({f"table_{i}": t for i, t in enumerate(self.tables)})
        for i, (w, b) in enumerate(self.layers):
            arrays[f"layer_{i}_weight"] = w
            arrays[f"layer_{i}_bias"] = b
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> UserEncoder:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != USER_ENCODER_FORMAT:
                    raise BundleError(
                        f"user encoder {path} has format {meta.get('format')!r}, "
                        f"this version reads {USER_ENCODER_FORMAT}"
                    )
                tables = [z[f"table_{i}"] for i in range(len(meta["inputs"]))]
                layers = [
                    (z[f"layer_{i}_weight"], z[f"layer_{i}_bias"])
                    for i in range(meta["num_layers"])
                ]
        except BundleError:
            raise
        except Exception as exc:  # zipfile/json/KeyError: all mean "not a valid encoder file"
            raise BundleError(
                f"cannot read user encoder {path}: {type(exc).__name__}: {exc}"
            ) from None
        return cls(
            spec=_tower_spec(meta["spec"]),
            vocab=TowerVocab.from_dict(meta["vocab"]),
            item_vocab=Vocab(list(meta["item_ids"])),
            inputs=meta["inputs"],
            tables=tables,
            layers=layers,
            activation=meta["activation"],
        )


def _tower_spec(d: Mapping[str, Any]) -> TowerSpec:
    """asdict(TowerSpec) → TowerSpec, through the validating config path."""
    clean = {k: v for k, v in d.items() if v is not None}
    return FeatureSpec.from_dict({"user": clean}).user
