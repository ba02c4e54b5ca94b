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
