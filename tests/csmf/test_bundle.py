"""The bundle format: round trip, exactness against the torch model, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from csmf.bundle import (
    BUNDLE_FORMAT,
    INDEX_FILE,
    MANIFEST_NAME,
    USERS_FILE,
    load_bundle,
    read_manifest,
)
from csmf.checkpoint import load_checkpoint
from csmf.errors import BundleError, WeightsError
from csmf.features import encode_rows
from csmf.index import Where
from csmf.user_encoder import CodedHistory, HistoryTable, UserEncoder
from csmf.weights import slice_scale

WEIGHTS = [(1.0, 1.8, 1.2), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.3, 2.0, 0.7)]


@pytest.fixture(params=["random", "trained"])
def run_and_bundle(request) -> tuple[Path, Path]:
    """(run, flat bundle) of the random-weight run (random owners, interleaved) and of a small
    trained one (tests/fixtures/trained.py): served and evaluated scores must agree on both."""
    if request.param == "random":
        return request.getfixturevalue("tiny_run"), request.getfixturevalue("flat_bundle")
    return request.getfixturevalue("trained_run"), request.getfixturevalue("trained_bundle")


@pytest.fixture()
def bundle_copy(flat_bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(flat_bundle, dst)
    return dst


def test_round_trip(flat_bundle, tiny_dataset):
    b = load_bundle(flat_bundle)
    m = read_manifest(flat_bundle)
    assert b.manifest == m and m.format == BUNDLE_FORMAT
    assert b.objectives == ("exposure", "click", "conversion")
    assert sum(b.slice_sizes) == b.dim == b.encoder.dim == b.index.dim == 12
    items = pq.read_table(tiny_dataset / "items.parquet")
    assert b.item_ids.tolist() == items.column("item_id").to_pylist()
    assert b.item_meta["title"] == items.column("title").to_pylist()
    assert len(b.index) == len(b.item_ids) == m.item_count
    assert b.item_rows["i7"] == 7
    users = pq.read_table(tiny_dataset / "users.parquet").to_pylist()
    assert len(b.users) == len(users)
    feats, hist = b.users.get(users[3]["user_id"])
    assert feats == users[3]  # raw features, id column included
    assert all(isinstance(h, str) for h in hist)
    assert b.users.get("nobody") is None
    np.testing.assert_array_equal(b.scale([1, 1.8, 1.2]), slice_scale([1, 1.8, 1.2], b.slice_sizes))
    np.testing.assert_array_equal(
        b.scale({"click": 1.8, "exposure": 1, "conversion": 1.2}), b.scale([1, 1.8, 1.2])
    )
    with pytest.raises(WeightsError):
        b.scale([0, 0, 0])


def test_snapshot_history_is_the_train_split(flat_bundle, tiny_dataset):
    """History = the user's train events (trainer's split), oldest → newest."""
    b = load_bundle(flat_bundle)
    events = pq.read_table(tiny_dataset / "events.parquet").to_pylist()
    for uid in ("u1", "u2", "u5"):
        mine = [
            (e["timestamp"], i, e["item_id"]) for i, e in enumerate(events) if e["user_id"] == uid
        ]
        mine.sort()
        _, hist = b.users.get(uid)
        n = len(mine)
        if n >= 3:
            n_test = min(max(1, int(np.floor(n * 0.2 + 0.5))), n - 1)
            n_val = min(max(1, int(np.floor(n * 0.1 + 0.5))), n - 1 - n_test)
            n_train = n - n_test - n_val
        else:
            n_train = n
        assert hist == [it for _, _, it in mine[:n_train]]


def _torch_scores(run, bundle, user_ids, weights):
    """Σ_t k_t s_t from the torch model: per-objective partial dot products (unpermuted)."""
    ckpt = load_checkpoint(run)
    model = ckpt.build_model()
    rows, hists = zip(*(bundle.users.get(u) for u in user_ids), strict=True)
    uin = bundle.encoder.encode_inputs(list(rows), list(hists))
    items = pq.read_table(Path(ckpt.dataset) / "items.parquet").to_pydict()
    iin = encode_rows(ckpt.features.item, ckpt.item_vocab, items)
    with torch.no_grad():
        e = model.user({k: torch.from_numpy(v) for k, v in uin.items()}).double()  # (U, D)
        v = model.item({k: torch.from_numpy(v) for k, v in iin.items()}).double()  # (N, D)
        masks = model.objective_masks().double()  # (T, D)
        s = torch.einsum("ud,td,nd->utn", e, masks, v)  # (U, T, N) per-objective scores
        k = torch.tensor(weights, dtype=torch.float64)
        return torch.einsum("t,utn->un", k, s).numpy()


@pytest.mark.parametrize("weights", WEIGHTS)
def test_bundle_scores_equal_torch_weighted_sum(run_and_bundle, weights):
    run, bundle = run_and_bundle
    b = load_bundle(bundle)
    user_ids = b.users.ids[:20]
    rows, hists = zip(*(b.users.get(u) for u in user_ids), strict=True)
    e = b.encoder.encode(list(rows), list(hists))  # (U, D) permuted
    vectors = b.item_vectors(np.arange(len(b.index)))  # (N, D) permuted
    ours = (e * b.scale(weights)).astype(np.float64) @ vectors.T.astype(np.float64)
    ref = _torch_scores(run, b, user_ids, weights)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, rel
    # and the index's own search returns the exact top-k with exact scores
    q = (e * b.scale(weights)).astype(np.float32)
    scores, found = b.search(q, 10)
    best = np.sort(ref, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(scores, best, rtol=1e-5, atol=1e-6)


def test_user_encoder_matches_torch_tower_and_round_trips(run_and_bundle, tmp_path):
    run, bundle = run_and_bundle
    b = load_bundle(bundle)
    ckpt = load_checkpoint(run)
    model = ckpt.build_model()
    perm = np.asarray(b.manifest.output_permutation)
    rows = [b.users.get(u)[0] for u in b.users.ids[:10]] + [{}, {"user_id": "u1"}]
    hists = [b.users.get(u)[1] for u in b.users.ids[:10]] + [[], ["i1", "unknown-item"]]
    inputs = b.encoder.encode_inputs(rows, hists)
    with torch.no_grad():
        ref = model.user({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()[:, perm]
    ours = b.encoder.encode(rows, hists)
    assert ours.dtype == np.float32 and ours.shape == (12, 12)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.encoder.cold_start(), ours[10], rtol=1e-5, atol=1e-6)
    b.encoder.save(tmp_path / "enc.npz")
    again = UserEncoder.load(tmp_path / "enc.npz")
    np.testing.assert_array_equal(again.encode(rows, hists), ours)


def test_search_with_exclusions(flat_bundle):
    b = load_bundle(flat_bundle)
    q = b.encoder.cold_start()[None] * b.scale([1, 1.8, 1.2])
    _, top = b.search(q, 5)
    _, rows = b.search(q, 5, Where(exclude=top[0]))
    assert not set(rows[0]) & set(top[0])


# -- refusals, each with its own message -----------------------------------------------------------


def test_corrupted_file_is_refused(bundle_copy):
    p = bundle_copy / USERS_FILE
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for users\.parquet"):
        load_bundle(bundle_copy)


def test_truncated_index_is_refused(bundle_copy):
    p = bundle_copy / INDEX_FILE
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"truncated or resized file index\.faiss"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match=r"cannot read FAISS index"):
        load_bundle(bundle_copy, verify=False)  # even unverified it cannot load


def _edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / MANIFEST_NAME).read_text())
    m.update(changes)
    (folder / MANIFEST_NAME).write_text(json.dumps(m))


def test_wrong_format_version_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, format=BUNDLE_FORMAT + 1)
    with pytest.raises(BundleError, match=r"unsupported bundle format 3 .* reads formats 1 and 2"):
        load_bundle(bundle_copy)
    _edit_manifest(bundle_copy, format="2")
    with pytest.raises(BundleError, match=r"unsupported bundle format '2'"):
        load_bundle(bundle_copy)


def test_format_1_bundle_is_upgraded_on_read(bundle_copy):
    """A bundle written before the typed manifest (format 1: no index.backend / index.files,
    no attributes) still loads and searches like its format-2 twin."""
    m = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    for key in ("backend", "files", "exact_below", "items"):
        m["index"].pop(key, None)
    m.pop("attributes")
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps({**m, "format": 1}))
    b = load_bundle(bundle_copy)
    assert b.manifest.format == BUNDLE_FORMAT and b.manifest.index.backend == "faiss"
    assert b.manifest.index.files == [INDEX_FILE] and b.manifest.attributes == []
    q = b.encoder.cold_start()[None]
    np.testing.assert_array_equal(b.search(q, 5)[1], load_bundle(bundle_copy).search(q, 5)[1])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"item_count": "many"}, r"item_count: .*integer.*\(got 'many'\)"),
        ({"objectives": None}, r"objectives: .*\(got None\)"),
        ({"index": {"type": "flat", "backend": "annoy"}}, r"index\.backend: .*'faiss' or 'milvus'"),
        ({"surprise": 1}, r"surprise: Extra inputs are not permitted"),
    ],
)
def test_manifest_fields_are_typed(bundle_copy, changes, message):
    _edit_manifest(bundle_copy, **changes)
    with pytest.raises(BundleError, match=r"invalid manifest .*manifest\.json: " + message):
        read_manifest(bundle_copy)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dim": 16}, r"slice sizes \[4, 4, 4\] sum to 12, manifest dim is 16"),
        ({"slice_sizes": [4, 4]}, r"3 objectives .* but 2 slice sizes"),
        ({"slice_sizes": [6, 6, 4], "dim": 16}, r"user encoder outputs 12 dims, manifest says 16"),
        ({"item_count": 7}, r"index holds 1500 vectors, manifest says 7 items"),
    ],
)
def test_mismatched_dims_are_refused(bundle_copy, changes, message):
    _edit_manifest(bundle_copy, **changes)
    with pytest.raises(BundleError, match="dimension mismatch|index holds") as info:
        load_bundle(bundle_copy)
    assert info.match(message)


def test_index_of_other_dimension_is_refused(bundle_copy):
    other = faiss.IndexFlatIP(8)
    other.add(np.zeros((1500, 8), np.float32))
    faiss.write_index(other, str(bundle_copy / INDEX_FILE))
    with pytest.raises(BundleError, match=r"index has dimension 8, manifest says 12"):
        load_bundle(bundle_copy, verify=False)


def test_missing_manifest_and_missing_folder(bundle_copy, tmp_path):
    (bundle_copy / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json in .*not a bundle"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match=r"no bundle at .*not a directory"):
        load_bundle(tmp_path / "nope")


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / USERS_FILE).unlink()
    with pytest.raises(BundleError, match=r"missing file users\.parquet"):
        load_bundle(bundle_copy)


def test_one_row_fast_path_equals_batch_path(flat_bundle):
    """encode([row]) skips encode_rows; it must give what the batch path gives, edge cases too."""
    enc = load_bundle(flat_bundle).encoder
    long_hist = [f"i{j}" for j in range(40)] + ["never-seen", None]
    rows = [
        ({}, []),
        ({"user_id": "u1", "gender": "F", "age": 30.0, "tags": ["a", "zzz"]}, ["i1", "i2"]),
        ({"user_id": "unknown", "gender": None, "age": float("nan"), "tags": []}, long_hist),
        ({"user_id": "u2", "age": None, "tags": ["a", "b", "c", "d", "a"]}, ["nope"]),
        ({"user_id": 3, "gender": "X", "age": 1e6}, []),
    ]
    batch = enc.encode([r for r, _ in rows], [h for _, h in rows])
    for i, (row, hist) in enumerate(rows):
        one = enc.encode([row], [hist])[0]
        assert np.abs(one - batch[i]).max() <= 1e-5 * max(1.0, np.abs(batch[i]).max())
    np.testing.assert_allclose(enc.encode([{}])[0], batch[0], rtol=1e-5, atol=1e-6)


def test_stored_history_encodes_exactly_like_its_ids(flat_bundle):
    """The snapshot's pre-resolved histories (numpy gathers) give bit-identical user vectors to
    the same histories as lists of ids, and their index rows match the ids' rows."""
    b = load_bundle(flat_bundle)
    got = [b.users.get(u) for u in b.users.ids[:12]]
    assert all(isinstance(h, CodedHistory) and h.resolved for _, h in got)
    rows = [r for r, _ in got]
    coded = [h for _, h in got]
    plain = [list(h) for h in coded]
    assert coded == plain and any(len(h) for h in plain)
    np.testing.assert_array_equal(b.encoder.encode(rows, coded), b.encoder.encode(rows, plain))
    for r, c, p in zip(rows, coded, plain, strict=True):  # the one-row fast path
        np.testing.assert_array_equal(b.encoder.encode([r], [c]), b.encoder.encode([r], [p]))
        assert c.rows().tolist() == [b.item_rows[i] for i in p if i in b.item_rows]
    # ids outside the encoder vocabulary and the index: UNK to the encoder, no row
    table = HistoryTable([plain[0][0], "never-seen", plain[0][-1]])
    table.resolve(b.encoder.item_vocab.index, b.item_rows)
    h = CodedHistory(np.array([0, 1, 2, 1], np.int32), table)
    ids = [plain[0][0], "never-seen", plain[0][-1], "never-seen"]
    assert h == ids and h[1:3] == ids[1:3] and len(h) == 4
    np.testing.assert_array_equal(
        b.encoder.encode([rows[0]], [h]), b.encoder.encode([rows[0]], [ids])
    )
    assert h.rows().tolist() == [b.item_rows[ids[0]], b.item_rows[ids[2]]]
    unresolved = CodedHistory(h.codes, HistoryTable(table.ids))  # falls back to the id lookup
    np.testing.assert_array_equal(
        b.encoder.encode([rows[0]], [unresolved]), b.encoder.encode([rows[0]], [ids])
    )
