"""Pre-serialised JSON of the catalogue's constant item fields, for the response hot path.

A returned item is ``{"item_id": ..., "meta": {...}, "score": ...}``, plus ``"scores"`` (the
per-objective scores) with ``explain``. Only the scores change from request to request, so each
item's ``{"item_id":…,"meta":{…},"score":`` prefix is serialised once, at load time, as one bytes
object per item. A response is those prefixes joined around the request's scores, which are
serialised together in one ``to_json`` call: no per-item dicts, no per-item serialisation.
Measured on 50-item responses (100k items): 24.7 µs with dicts + ``to_json`` vs 9.5 µs; slicing
one shared buffer instead of per-item objects saved memory but cost 24.8 µs. The price is memory,
``ItemJson.bytes`` (reported by ``GET /admin/bundle``): about 100 bytes per item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import orjson
from pydantic_core import to_json


class ItemJson:
    def __init__(self, item_ids: Sequence[str], meta: Mapping[str, Sequence]) -> None:
        names = list(meta)
        columns = [meta[c] for c in names]
        self.names = names
        prefixes = np.empty(len(item_ids), dtype=object)
        for row, iid in enumerate(item_ids):
            prefixes[row] = self._prefix(iid, [col[row] for col in columns])
        self.prefixes = prefixes.tolist()  # a list: indexing it per row beats a numpy gather
        self.bytes = sum(map(len, prefixes)) + 8 * len(prefixes)

    def _prefix(self, item_id: str, values: Sequence) -> bytes:
        m = b',"meta":' + to_json(dict(zip(self.names, values, strict=True))) if self.names else b""
        return b'{"item_id":' + to_json(item_id) + m + b',"score":'

    def set_rows(self, rows: Sequence[int], item_ids: Sequence[str], meta: Mapping) -> None:
        """Item writes: (re)serialise ``rows`` (existing, or the next ones: appended). A list
        item assignment or append is atomic, so concurrent renders see the old or the new."""
        prefixes = self.prefixes
        for r in sorted(rows):
            p = self._prefix(item_ids[r], [meta[c][r] for c in self.names])
            if r < len(prefixes):
                self.bytes += len(p) - len(prefixes[r])
                prefixes[r] = p
            else:
                prefixes.extend([b'{"item_id":null,"score":'] * (r - len(prefixes)))
                prefixes.append(p)
                self.bytes += len(p) + 8

    def render(
        self,
        rows: Sequence[int],
        scores: Sequence[float],
        per_objective: np.ndarray | None = None,
        objectives: Sequence[str] = (),
    ) -> bytes:
        """The JSON array of the items at ``rows`` (index rows) with their fused ``scores`` and,
        if given, their (k, T) ``per_objective`` scores named by ``objectives``."""
        if len(rows) == 0:
            return b"[]"
        prefixes = self.prefixes
        pre = [prefixes[r] for r in rows]
        fused = orjson.dumps(list(scores))[1:-1].split(b",")  # numbers never contain a comma
        if per_objective is None:
            body = b"},".join(map(bytes.__add__, pre, fused))
        else:  # ,"scores":{"exposure":s_1,"click":s_2,...}: names encoded once, numbers at once
            keys = _score_keys(tuple(objectives))
            t = len(keys)
            if per_objective.shape != (len(pre), t):
                raise ValueError(
                    f"per_objective is {per_objective.shape}, expected ({len(pre)}, {t})"
                )
            nums = orjson.dumps(per_objective.ravel().tolist())[1:-1].split(b",")
            parts = []
            for i, (p, s) in enumerate(zip(pre, fused, strict=True)):
                parts += [p, s]
                for j in range(t):
                    parts += [keys[j], nums[i * t + j]]
                parts.append(b"}},")
            parts[-1] = b"}}"
            return b"[" + b"".join(parts) + b"]"
        return b"[" + body + b"}]"


@lru_cache(maxsize=16)
def _score_keys(objectives: tuple[str, ...]) -> list[bytes]:
    """``,"scores":{"name":`` then ``,"name":`` for each further objective."""
    return [
        (b',"scores":{' if j == 0 else b",") + to_json(name) + b":"
        for j, name in enumerate(objectives)
    ]
