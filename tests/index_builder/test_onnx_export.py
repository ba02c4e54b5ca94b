"""The user tower as ONNX: `csmf export onnx` and `build-index --onnx` write a graph that
onnxruntime runs to the same vectors as the trained torch tower (1,000 users: stored and inline
histories, unknown users and items, histories past max_len, missing features), with a dynamic
batch and history length; bad bundles and output paths are clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from csmf.bundle import ENCODER_FILE, load_bundle, read_manifest
from csmf.checkpoint import load_checkpoint
from csmf.errors import BundleError
from csmf.onnx_encoder import ONNX_FILE, OnnxUserEncoder
from csmf.user_encoder import UserEncoder
from index_builder.cli import export_app

TOL = 1e-5
runner = CliRunner()


def thousand_users(bundle, n: int = 1000, seed: int = 0) -> tuple[list[dict], list[list[str]]]:
    """(raw feature rows, histories) as the service builds them: known users with their stored
    history or an inline one, unknown users with none, known or unknown item ids, histories
    longer than max_len, missing and out-of-range features."""
    rng = random.Random(seed)
    users = bundle.users
    items = bundle.item_ids.tolist()
    id_col = bundle.encoder.spec.id_column
    max_len = bundle.encoder.spec.history.max_len
    rows, hists = [], []
    for i in range(n):
        kind = i % 6
        uid = rng.choice(users.ids)
        row, stored = users.get(uid)
        hist = list(stored) if kind == 0 else stored  # a plain list and a CodedHistory
        if kind == 2:  # inline history replaces the stored one, longer than max_len
            hist = rng.sample(items, rng.randint(1, 3 * max_len))
        elif kind == 3:  # unknown user, no history: every input UNK / padding
            row, hist = {id_col: f"ghost-{i}"}, []
        elif kind == 4:  # unknown user, inline history with ids the bundle does not know
            row = {id_col: f"ghost-{i}"}
            hist = [rng.choice(items) if rng.random() < 0.5 else f"unknown-{j}" for j in range(5)]
        elif kind == 5:  # a known user whose features are missing or absurd
            row = {id_col: uid, "age": rng.choice([None, float("nan"), 1e308, -40.0])}
        rows.append(row)
        hists.append(hist)
    return rows, hists


@pytest.fixture(scope="module")
def torch_tower(trained_run, trained_onnx_bundle):
    """inputs → (n, D) of the trained torch user tower, permuted like the bundle."""
    model = load_checkpoint(trained_run).build_model().eval()
    perm = np.asarray(read_manifest(trained_onnx_bundle).output_permutation)

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = model.user({k: torch.from_numpy(v) for k, v in inputs.items()})
        return out.numpy()[:, perm]

    return run


def test_onnxruntime_matches_torch_on_1000_users(trained_onnx_bundle, torch_tower):
    bundle = load_bundle(trained_onnx_bundle, encoder="onnx")
    assert isinstance(bundle.encoder, OnnxUserEncoder)
    rows, hists = thousand_users(bundle)
    inputs = bundle.encoder.encode_inputs(rows, hists)
    want = torch_tower(inputs)  # (1000, D)
    got = bundle.encoder.forward(inputs)  # one batch of 1,000
    assert got.shape == want.shape == (1000, bundle.dim)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 0.1  # a trained tower, not zeros
    # batch 1, as the service encodes one request
    one = np.concatenate(
        [bundle.encoder.encode([r], [h]) for r, h in zip(rows, hists, strict=True)]
    )
    assert np.abs(one - want).max() <= TOL
    # and the numpy encoder the service uses by default agrees too (relative to the values: a
    # clipped 1e308 feature gives large ones, where float32 sums in another order differ more)
    numpy_encoder = UserEncoder.load(trained_onnx_bundle / ENCODER_FILE)
    np.testing.assert_allclose(numpy_encoder.encode(rows, hists), want, rtol=TOL, atol=TOL)


def test_history_length_and_batch_are_dynamic(trained_onnx_bundle, torch_tower):
    bundle = load_bundle(trained_onnx_bundle, encoder="onnx")
    rows, hists = thousand_users(bundle, n=60, seed=1)
    inputs = bundle.encoder.encode_inputs(rows, hists)
    want = torch_tower(inputs)
    hist = inputs["history"]  # (60, max_len), right-aligned, 0 = padding
    for length in (1, 3, hist.shape[1], 2 * hist.shape[1]):
        if length <= hist.shape[1]:
            h = hist[:, -length:]
        else:  # more padding on the left changes nothing
            h = np.concatenate([np.zeros((len(hist), length - hist.shape[1]), np.int64), hist], 1)
        got = bundle.encoder.forward({**inputs, "history": h})
        ref = torch_tower({**inputs, "history": h})
        assert np.abs(got - ref).max() <= TOL
        if length >= hist.shape[1]:
            assert np.abs(got - want).max() <= TOL
    for b in (1, 2, 17):
        part = {k: v[:b] for k, v in inputs.items()}
        assert np.abs(bundle.encoder.forward(part) - want[:b]).max() <= TOL


def test_the_onnx_file_is_a_checksummed_bundle_file(trained_onnx_bundle, trained_bundle):
    from csmf.bundle import sha256_file

    m = read_manifest(trained_onnx_bundle)
    assert m.files[ONNX_FILE].sha256 == sha256_file(trained_onnx_bundle / ONNX_FILE)
    assert ONNX_FILE not in read_manifest(trained_bundle).files  # only with --onnx
    with pytest.raises(BundleError, match=r"has no user_tower.onnx in its manifest.*--onnx"):
        load_bundle(trained_bundle, encoder="onnx")


def test_export_command_writes_a_graph_equal_to_the_bundles(trained_bundle, tmp_path, torch_tower):
    res = runner.invoke(export_app, ["onnx", str(trained_bundle), str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / ONNX_FILE}" in res.output and "max |difference|" in res.output
    numpy_encoder = UserEncoder.load(trained_bundle / ENCODER_FILE)
    enc = OnnxUserEncoder(numpy_encoder, tmp_path / ONNX_FILE)
    bundle = load_bundle(trained_bundle)
    rows, hists = thousand_users(bundle, n=200, seed=2)
    inputs = enc.encode_inputs(rows, hists)
    assert np.abs(enc.forward(inputs) - torch_tower(inputs)).max() <= TOL
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place


def test_export_refuses_a_corrupt_bundle_and_a_path_inside_a_bundle(trained_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    with open(bad / ENCODER_FILE, "r+b") as fh:  # flip one byte of the tower
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    res = runner.invoke(export_app, ["onnx", str(bad), str(tmp_path / "t.onnx")])
    assert res.exit_code == 2
    assert "error: checksum mismatch for user_encoder.npz" in res.output
    assert not (tmp_path / "t.onnx").exists()

    res = runner.invoke(export_app, ["onnx", str(trained_bundle), str(trained_bundle)])
    assert res.exit_code == 2
    assert "is inside the bundle" in res.output and "--onnx" in res.output
    assert not (trained_bundle / ONNX_FILE).exists()

    res = runner.invoke(export_app, ["onnx", str(trained_bundle), str(tmp_path / "no" / "t.onnx")])
    assert res.exit_code == 2 and "no folder" in res.output


def test_an_unexportable_tower_is_a_clear_error(trained_bundle, tmp_path):
    """In a process where onnxscript cannot be imported torch's exporter cannot run: one error
    line naming the missing module, exit 2, no file."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['onnxscript'] = None\n"
        "from csmf.cli import main\n"
        f"main(['export', 'onnx', {str(trained_bundle)!r}, {str(tmp_path / 't.onnx')!r}])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: cannot export the user tower: torch.onnx.export needs ")
    assert "onnxscript" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_an_onnx_file_of_another_tower_is_refused(trained_onnx_bundle, flat_bundle):
    other = UserEncoder.load(flat_bundle / ENCODER_FILE)
    with pytest.raises(BundleError, match="exported from another tower|must output"):
        OnnxUserEncoder(other, trained_onnx_bundle / ONNX_FILE)
