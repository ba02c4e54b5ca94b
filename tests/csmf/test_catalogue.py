"""The living catalogue over a real built bundle: the bundle's item tower reproduces the indexed
vectors, an unknown id encodes from its features with the unknown id row, writes grow the item
table and the index together, a restart replays the log to the same state, and bad item rows get
errors by id while the good ones are written."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from csmf.bundle import load_bundle
from csmf.catalogue import Catalogue, check_ids, check_items
from csmf.errors import ItemWriteError
from csmf.features import UNK
from csmf.index import RowSet, Where
from csmf.index.filters import parse_filter


@pytest.fixture
def bundle_copy(flat_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(flat_bundle, out)
    return out


def _items(bundle_path, n=None):
    data = load_bundle(bundle_path).manifest.source["items"]
    return pq.read_table(data).to_pylist()[:n]


def test_item_tower_reproduces_the_indexed_vectors(bundle_copy):
    b = load_bundle(bundle_copy)
    assert b.item_encoder is not None
    rows = _items(bundle_copy)
    v = b.item_encoder.encode(rows)
    np.testing.assert_allclose(v, b.index.vectors(np.arange(len(rows))), rtol=1e-4, atol=1e-4)


def test_an_unknown_id_encodes_from_its_features_at_the_unknown_row(bundle_copy):
    b = load_bundle(bundle_copy)
    enc = b.item_encoder
    known = _items(bundle_copy, 3)
    cold = [{**r, "item_id": f"brand-new-{i}"} for i, r in enumerate(known)]
    v_known, v_cold = enc.encode(known), enc.encode(cold)
    assert not np.allclose(v_known, v_cold)  # the id row matters
    ids = enc.encode_inputs(cold)["id"]
    assert (ids == UNK).all()
    other = enc.encode([{**r, "item_id": "another-new-one"} for r in known])
    np.testing.assert_allclose(v_cold, other, rtol=1e-6)  # every unknown id: the same UNK row


def _q(b, n=5):
    return np.random.default_rng(0).standard_normal((n, b.dim)).astype(np.float32)


def test_writes_grow_the_table_and_the_index_together(bundle_copy):
    b = load_bundle(bundle_copy)
    cat = Catalogue(b)
    n0 = len(b.item_ids)
    # new items pointing the way of the queries: they must come first
    vecs = (_q(b) * 50).tolist()
    items = [
        {"item_id": f"new{i}", "genre": "drama", "price": 5.0, "title": f"New {i}", "vector": v}
        for i, v in enumerate(vecs)
    ]
    checked = check_items(cat, items, 100)
    assert not checked.errors
    rec = cat.upsert(checked)
    assert rec.seq == 1 and cat.position == (1, rec.end)
    assert len(b.item_ids) == n0 + 5 and list(b.item_ids[n0:]) == [f"new{i}" for i in range(5)]
    assert b.item_meta["title"][n0 + 2] == "New 2"
    _, rows = b.search(_q(b), 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(n0, n0 + 5))
    drama = RowSet(
        b.attributes.mask(parse_filter({"field": "genre", "eq": "drama"}, b.attributes.schema))
    )
    assert drama.mask[n0:].all() and len(drama.mask) == n0 + 5
    _, rows = b.search(_q(b), 1, Where(allowed=drama))
    np.testing.assert_array_equal(rows[:, 0], np.arange(n0, n0 + 5))
    cat.delete(["new0", "new1", "nope"])
    cat.delete(["new0"])  # idempotent
    _, rows = b.search(_q(b), 10)
    assert not {n0, n0 + 1} & set(rows.ravel().tolist())
    assert rows[2, 0] == n0 + 2
    # a restart replays the log onto the built bundle: same rows, same answers
    again = Catalogue(load_bundle(bundle_copy))
    assert again.catch_up() == 3
    b2 = again.bundle
    assert list(b2.item_ids) == list(b.item_ids)
    np.testing.assert_array_equal(b2.dead, b.dead)
    np.testing.assert_array_equal(b2.search(_q(b), 10)[1], rows)


def test_features_give_cold_items_their_vectors(bundle_copy):
    b = load_bundle(bundle_copy)
    cat = Catalogue(b)
    row = dict(_items(bundle_copy, 1)[0])
    row["item_id"] = "cold-1"
    checked = check_items(cat, [row], 10)
    assert not checked.errors, checked.errors
    cat.upsert(checked)
    r = b.item_rows["cold-1"]
    np.testing.assert_allclose(b.index.vectors([r])[0], b.item_encoder.encode([row])[0], rtol=1e-5)


def test_bad_items_get_errors_by_id_and_the_good_ones_are_written(bundle_copy):
    b = load_bundle(bundle_copy)
    cat = Catalogue(b)
    good = {"item_id": "ok", "genre": "drama", "price": 3.0}
    items = [
        good,
        {"item_id": "u1", "colour": "red"},
        {"item_id": "u2", "vector": [1.0, 2.0]},
        {"item_id": "u3", "price": float("nan")},
        {"item_id": 17, "genre": "drama"},
        {"item_id": "u4", "genre": ["x"]},
        {"item_id": "ok", "genre": "comedy"},
        "not an object",
        {"genre": "drama"},
    ]
    c = check_items(cat, items, 100)
    assert c.ids == ["ok"]
    assert "unknown column 'colour'" in c.errors["u1"]
    assert f"must have {b.dim} values" in c.errors["u2"]
    assert "'price' must be a finite number" in c.errors["u3"]
    assert "non-empty string, got 17" in c.errors["items[4]"]
    assert "'genre' must be a string" in c.errors["u4"]
    assert "twice" in c.errors["ok"]
    assert "must be an object" in c.errors["items[7]"]
    assert "missing the item id" in c.errors["items[8]"]
    with pytest.raises(ValueError, match="at most 3 items"):
        check_items(cat, [good] * 4, 3)
    ids, errors = check_ids(["a", 3, "a", ""], 10)
    assert ids == ["a"] and set(errors) == {"ids[1]", "ids[3]"}


def test_a_read_only_index_refuses_before_anything_is_logged(tiny_run, tmp_path):
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    out = tmp_path / "pq"
    build_bundle(tiny_run, out, BuildConfig(index="ivfpq", recall_floor=0.0), progress=False)
    cat = Catalogue(load_bundle(out))
    checked = check_items(cat, [{"item_id": "new", "genre": "drama"}], 10)
    with pytest.raises(ItemWriteError, match="takes no item writes"):
        cat.upsert(checked)
    with pytest.raises(ItemWriteError, match="takes no item writes"):
        cat.delete(["i1"])
    assert not cat.log.exists()  # nothing durable that could not be applied


def test_a_rebuilt_bundle_replays_the_log_with_its_own_item_tower(tiny_run, tiny_dataset, tmp_path):
    """The bundle at the same path rebuilt from another model: items written from their
    features are re-encoded by the new tower; a vector given for the old model is skipped."""
    from fixtures.bundles import make_run

    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    out = tmp_path / "b"
    build_bundle(tiny_run, out, BuildConfig(index="flat"), progress=False)
    b = load_bundle(out)
    cat = Catalogue(b)
    row = {**_items(out, 1)[0], "item_id": "cold-x"}
    given = {"item_id": "given-x", "genre": "drama", "vector": [1.0] * b.dim}
    cat.upsert(check_items(cat, [row, given], 10))
    cat.delete(["i3"])
    other = make_run(tmp_path / "run1", tiny_dataset, seed=1)
    build_bundle(other, out, BuildConfig(index="flat"), progress=False)  # replaces the bundle
    new = Catalogue(load_bundle(out))
    assert new.bundle.model_version != b.model_version
    assert new.catch_up() == 2
    nb = new.bundle
    assert "given-x" not in nb.item_rows and new.info()["skipped_other_model"] == 1
    r = nb.item_rows["cold-x"]
    np.testing.assert_allclose(
        nb.index.vectors([r])[0], nb.item_encoder.encode([row])[0], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(nb.index.vectors([r])[0], b.index.vectors([b.item_rows["cold-x"]])[0])
    assert nb.dead[nb.item_rows["i3"]]
