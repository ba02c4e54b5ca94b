"""`csmf serve` fails fast, with one clear line, on what it can check before starting uvicorn."""

import os
import shutil
import subprocess
import sys

import pytest


def _serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CSMF_")}
    cmd = [sys.executable, "-m", "csmf.cli", "serve", *args]
    return subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_missing_bundle(tmp_path):
    r = _serve("--bundle", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert f"error: no bundle at {tmp_path / 'nope'}" in r.stderr


def test_bad_setting(bundles):
    r = _serve("--bundle", str(bundles["flat"]), CSMF_MAX_K="lots")
    assert r.returncode == 2
    assert "invalid CSMF_* setting" in r.stderr and "max_k" in r.stderr


def _copy(bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


@pytest.mark.parametrize("verify", ["true", "false"])
def test_truncated_bundle_is_one_error_line(bundles, tmp_path, verify):
    b = _copy(bundles["flat"], tmp_path)
    data = (b / "index.faiss").read_bytes()
    (b / "index.faiss").write_bytes(data[: len(data) // 2])
    r = _serve("--bundle", str(b), CSMF_VERIFY_BUNDLE=verify)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "index.faiss" in lines[0]
    assert "truncated" in lines[0] and "Traceback" not in r.stderr


def test_corrupt_bundle_file_and_manifest_are_one_error_line(bundles, tmp_path):
    b = _copy(bundles["flat"], tmp_path)
    data = bytearray((b / "items.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    (b / "items.parquet").write_bytes(bytes(data))
    r = _serve("--bundle", str(b))
    assert r.returncode == 2 and r.stderr.startswith("error: checksum mismatch for items.parquet")
    assert len(r.stderr.strip().splitlines()) == 1
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[: len(text) // 3])
    r = _serve("--bundle", str(b))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_lists_the_options():
    r = _serve("--help")
    assert r.returncode == 0
    for opt in ("--bundle", "--host", "--port", "--workers"):
        assert opt in r.stdout


# As if PyTorch were not installed: the core install (no `train` extra) has no torch.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_serving_needs_no_torch(bundles, tmp_path):
    """Load a bundle, start the app and answer a retrieve with torch unimportable."""
    code = NO_TORCH + (
        "from fastapi.testclient import TestClient\n"
        "from service.main import create_app\n"
        "from service.settings import Settings\n"
        f"s = Settings(bundle={str(bundles['flat'])!r}, scenarios_file={str(tmp_path / 's.json')!r})\n"
        "with TestClient(create_app(s)) as c:\n"
        "    r = c.post('/v1/retrieve', json={'user_id': 'nobody', 'k': 3, 'explain': True})\n"
        "    assert r.status_code == 200, r.text\n"
        "    print(len(r.json()['items']), r.json()['cold_start'])\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSMF_")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "True"]


def test_training_commands_without_torch_say_what_to_install():
    for argv in (["bench", "quality"], ["build-index", "--run", "x", "--out", "y"]):
        code = NO_TORCH + f"from csmf.cli import main; main({argv!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert "needs PyTorch" in r.stderr and "csmf-retrieval[train]" in r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_event_log_path_that_is_a_file_is_one_error_line(bundles, tmp_path, where):
    f = tmp_path / "notes.txt"
    f.write_text("not a folder")
    path = f if where == "file" else f / "log"
    r = _serve("--bundle", str(bundles["flat"]), CSMF_EVENT_LOG_DIR=str(path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: event log: "), r.stderr
    assert str(f) in lines[0] and "CSMF_EVENT_LOG_DIR" in lines[0] and "Traceback" not in r.stderr
    assert f.read_text() == "not a folder"
