"""CSMF_ENCODER=onnx: the service encodes users with the bundle's user_tower.onnx in onnxruntime
and serves what the numpy encoder serves; a bundle without the file, or an install without
onnxruntime, fails at startup with one clear line, never at the first request."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from pydantic import ValidationError

from csmf.bundle import load_bundle
from csmf.errors import BundleError
from csmf.onnx_encoder import OnnxUserEncoder


def varied_bodies(bundle_path, n: int = 300, seed: int = 0) -> list[dict]:
    b = load_bundle(bundle_path, verify=False)
    users, items = b.users.ids, b.item_ids.tolist()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body: dict = {"user_id": rng.choice(users), "k": 10}
        if i % 5 == 1:
            body["user_id"] = f"ghost-{i}"  # unknown: cold start
        if i % 5 == 2:
            body["history"] = rng.sample(items, rng.randint(1, 12))
        if i % 5 == 3:
            body = {"user_id": f"ghost-{i}", "history": [rng.choice(items), "not-an-item"]}
        if i % 4 == 0:
            body["weights"] = [round(rng.uniform(0, 2), 2) for _ in range(3)]
        if i % 7 == 0:
            body["explain"] = True
        out.append(body)
    return out


def test_onnx_encoder_serves_what_numpy_serves(trained_onnx_bundle, make_client):
    numpy_client = make_client(trained_onnx_bundle)
    onnx_client = make_client(trained_onnx_bundle, encoder="onnx")
    assert isinstance(
        onnx_client.app.state.csmf.bundle.retriever.encoder, OnnxUserEncoder
    )  # the encoder the app actually uses
    for body in varied_bodies(trained_onnx_bundle):
        a = numpy_client.post("/v1/retrieve", json=body)
        b = onnx_client.post("/v1/retrieve", json=body)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        a, b = a.json(), b.json()
        assert a["cold_start"] == b["cold_start"]
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]], body
        for x, y in zip(a["items"], b["items"], strict=True):
            assert abs(x["score"] - y["score"]) <= 1e-5 * max(1.0, abs(x["score"]))
            if "scores" in x:
                for o in x["scores"]:
                    assert abs(x["scores"][o] - y["scores"][o]) <= 1e-5 * max(
                        1.0, abs(x["scores"][o])
                    )
    batch = {"users": [{"user_id": u} for u in ("u1", "u2", "ghost")], "k": 5}
    a = numpy_client.post("/v1/retrieve/batch", json=batch).json()
    b = onnx_client.post("/v1/retrieve/batch", json=batch).json()
    assert [[x["item_id"] for x in r["items"]] for r in a["results"]] == [
        [x["item_id"] for x in r["items"]] for r in b["results"]
    ]


def test_a_bundle_without_the_onnx_file_fails_at_startup(trained_bundle, make_client):
    with pytest.raises(BundleError, match=r"has no user_tower.onnx in its manifest"):
        make_client(trained_bundle, encoder="onnx")


def test_missing_onnxruntime_is_a_settings_error(trained_onnx_bundle, tmp_path, monkeypatch):
    from service.settings import Settings

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(ValidationError, match=r"needs onnxruntime.*csmf-retrieval\[onnx\]"):
        Settings(_env_file=None, bundle=trained_onnx_bundle, encoder="onnx")
    Settings(_env_file=None, bundle=trained_onnx_bundle)  # numpy does not need it


def _serve(code_prefix: str, bundle, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CSMF_")}
    code = f"{code_prefix}\nfrom csmf.cli import main\nmain(['serve', '--bundle', {str(bundle)!r}])"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_csmf_serve_refuses_at_startup(trained_bundle, trained_onnx_bundle):
    r = _serve("", trained_bundle, CSMF_ENCODER="onnx")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no user_tower.onnx" in lines[0] and "--onnx" in lines[0]
    r = _serve(
        "import sys; sys.modules['onnxruntime'] = None", trained_onnx_bundle, CSMF_ENCODER="onnx"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: invalid CSMF_* setting") and "needs onnxruntime" in r.stderr
    assert "Traceback" not in r.stderr
