"""Milvus Lite end to end (real engine, real processes): `csmf build-index --backend milvus`,
`csmf serve` on that bundle behind a real uvicorn, the weighted search exact against FAISS Flat of
the same model, filters, and the version alias that makes a new bundle swap atomically."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from fixtures.services import AUTH, ROOT
from typer.testing import CliRunner

from csmf.bundle import load_bundle
from csmf.errors import BundleError
from index_builder.build import build_bundle
from index_builder.cli import app
from index_builder.config import BuildConfig

pytest.importorskip("pymilvus")
pytestmark = pytest.mark.slow
WEIGHTS = {"exposure": 0.5, "click": 2.0, "conversion": 1.5}
FILTER = {"or": [{"field": "genre", "eq": "drama"}, {"field": "price", "gte": 40}]}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csmf.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_build_index_and_serve_a_milvus_bundle(service_runs, bundles, serve, make_client, tmp_path):
    uri, out = tmp_path / "engine" / "milvus.db", tmp_path / "bundle"
    r = _cli(
        "build-index", "--run", str(service_runs[0]), "--out", str(out), "--backend", "milvus",
        "--uri", str(uri), "--index", "flat", "--collection", "items", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "items, 60 users, milvus FLAT" in r.stdout
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "milvus FLAT" in r.output and "collection=items__" in r.output
    assert not (out / "index.faiss").exists()

    svc = serve(out)
    ref = make_client(bundles["flat"])  # FAISS Flat of the same run: the reference
    for body in (
        {"user_id": "u3", "k": 30, "weights": WEIGHTS, "explain": True},
        {"user_id": "u7", "k": 20, "weights": WEIGHTS, "filter": FILTER, "exclude_seen": True},
        {"history": ["i1", "i9"], "k": 10, "exclude": ["i2", "i3"], "filter": FILTER},
    ):
        got = svc.client.post("/v1/retrieve", json=body)
        want = ref.post("/v1/retrieve", json=body).json()
        assert got.status_code == 200, got.text
        items = got.json()["items"]
        assert [it["item_id"] for it in items] == [it["item_id"] for it in want["items"]]
        np.testing.assert_allclose(
            [it["score"] for it in items], [it["score"] for it in want["items"]], rtol=1e-5
        )
        if body.get("explain"):
            for a, b in zip(items, want["items"], strict=True):
                for o in WEIGHTS:
                    assert abs(a["scores"][o] - b["scores"][o]) <= 1e-5 * max(
                        1, abs(b["scores"][o])
                    )
    batch = svc.client.post(
        "/v1/retrieve/batch",
        json={"users": [{"user_id": "u1"}, {"user_id": "u2"}], "k": 5, "filter": FILTER},
    )
    assert batch.status_code == 200, batch.text
    bad = svc.client.post("/v1/retrieve", json={"user_id": "u1", "filter": {"field": "x", "eq": 1}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "filter", "field"]
    info = svc.client.get("/admin/bundle", headers=AUTH).json()
    assert info["index"]["backend"] == "milvus" and info["index"]["exact"] is True


def test_new_bundle_moves_the_alias_and_old_bundles_keep_their_version(service_runs, tmp_path):
    from csmf.index.milvus import alias_target

    uri = str(tmp_path / "milvus.db")
    cfg = BuildConfig(backend="milvus", uri=uri, index="flat", collection="swap")
    a_path, a = build_bundle(service_runs[0], tmp_path / "a", cfg, progress=False)
    assert alias_target(uri, "swap") == a.index.collection_version
    b_path, b = build_bundle(service_runs[1], tmp_path / "b", cfg, progress=False)
    assert b.model_version != a.model_version
    assert alias_target(uri, "swap") == b.index.collection_version  # one atomic switch
    # A bundle pins its own version, so the one still serving keeps answering from its rows
    for path, flat_run in ((a_path, service_runs[0]), (b_path, service_runs[1])):
        bundle = load_bundle(path)
        ref = load_bundle(
            build_bundle(flat_run, tmp_path / f"ref-{path.name}", BuildConfig(index="flat"),
                         progress=False)[0]
        )  # fmt: skip
        q = bundle.encoder.encode([{}], [["i4", "i8"]]) * bundle.scale([1, 1.8, 1.2])
        s, r = bundle.search(q, 10)
        s_ref, r_ref = ref.search(q, 10)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6)
        bundle.index.close()
    # a third build keeps two versions: the oldest (A's) is dropped, and A says so clearly
    build_bundle(service_runs[0], tmp_path / "c", cfg, progress=False)
    with pytest.raises(
        BundleError, match="has no collection 'swap__.*' \\(this bundle's version\\)"
    ):
        load_bundle(a_path)
    load_bundle(b_path).index.close()
    # CSMF_INDEX_URI (Settings.index_uri) overrides the URI the bundle was built with
    with pytest.raises(BundleError, match="other.db has no collection 'swap__"):
        load_bundle(b_path, index_uri=str(tmp_path / "other.db"))
