"""Pre-serialised item JSON: byte-for-byte the JSON of the item dicts it replaces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic_core import to_json

from service.item_json import ItemJson

IDS = ["i0", 'quote"d', "ünïcode-✓", "back\\slash", "i4"]
META = {
    "title": ["A", None, "Tïtle, with comma", 'He said "hi"', ""],
    "year": [1999, 2000, 0, -1, 7],
}


def _reference(rows, scores, per=None, objectives=(), meta=META):
    items = []
    for j, (r, s) in enumerate(zip(rows, scores, strict=True)):
        item = {"item_id": IDS[r]}
        if meta:
            item["meta"] = {c: col[r] for c, col in meta.items()}
        item["score"] = s
        if per is not None:
            item["scores"] = dict(zip(objectives, per[j].tolist(), strict=True))
        items.append(item)
    return to_json(items)


@pytest.mark.parametrize("meta", [META, {}])
def test_render_equals_the_json_of_the_item_dicts(meta):
    ij = ItemJson(IDS, meta)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.choice(len(IDS), size=rng.integers(1, 6), replace=False).tolist()
        scores = (rng.normal(size=len(rows)) * 10.0 ** rng.integers(-8, 8)).astype(np.float32)
        scores = scores.tolist()
        assert ij.render(rows, scores) == _reference(rows, scores, meta=meta)
        per = rng.normal(size=(len(rows), 3)).astype(np.float32)
        objs = ("exposure", "click", "conversion")
        got = ij.render(rows, scores, per, objs)
        assert got == _reference(rows, scores, per, objs, meta)
        json.loads(got)  # and it is valid JSON


def test_render_edge_cases():
    ij = ItemJson(IDS, META)
    assert ij.render([], []) == b"[]"
    assert json.loads(ij.render([4, 4], [-0.0, 1e-45])) == [
        {"item_id": "i4", "meta": {"title": "", "year": 7}, "score": -0.0},
        {"item_id": "i4", "meta": {"title": "", "year": 7}, "score": 1e-45},
    ]
    assert ij.bytes > 0
