"""`csmf serve` fails fast, with one clear line, on what it can check before starting uvicorn."""

import os
import subprocess
import sys


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
