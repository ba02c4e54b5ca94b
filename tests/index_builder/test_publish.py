"""Atomic publish: failures and SIGKILL at any point leave nothing loadable and the old bundle intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from csmf.bundle import MANIFEST_NAME, STAGING_MARKER, load_bundle, read_manifest
from csmf.errors import BundleError
from index_builder import build as build_mod
from index_builder.build import build_bundle
from index_builder.config import BuildConfig
from index_builder.publish import clean_stale_staging

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def published(tiny_run, tmp_path):
    out = tmp_path / "bundles" / "tiny"
    _, m = build_bundle(tiny_run, out, BuildConfig(index="flat"), progress=False)
    return out, m


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_replacing_a_bundle_swaps_it_whole(tiny_run, published):
    out, old = published
    _, new = build_bundle(tiny_run, out, BuildConfig(index="ivf"), progress=False)
    assert load_bundle(out).index_type == "ivf"
    assert new.created_at >= old.created_at
    assert _leftovers(out) == []


@pytest.mark.parametrize(
    "step", ["encode_items", "build_vector_index", "write_manifest", "publish"]
)
def test_exception_midway_leaves_old_bundle(tiny_run, published, monkeypatch, step):
    out, old = published

    def boom(*a, **k):
        raise RuntimeError(f"injected failure in {step}")

    monkeypatch.setattr(build_mod, step, boom)
    with pytest.raises(RuntimeError, match="injected"):
        build_bundle(tiny_run, out, BuildConfig(index="ivf"), progress=False)
    assert read_manifest(out) == old
    assert load_bundle(out).index_type == "flat"
    assert _leftovers(out) == []  # the staging folder was removed


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from index_builder import build
    from index_builder.config import BuildConfig
    step = sys.argv[3]
    real = getattr(build, step)
    def die(*a, **k):
        if step == "publish":  # the manifest is complete in the staging folder: worst moment
            assert os.path.exists(os.path.join(a[0], "manifest.json"))
        else:
            real(*a, **k)  # let the step write its files, then die before the next one
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(build, step, die)
    build.build_bundle(sys.argv[1], sys.argv[2], BuildConfig(index="ivf"), progress=False)
    """
)


@pytest.mark.parametrize("step", ["encode_items", "build_vector_index", "publish"])
def test_sigkill_midway_leaves_nothing_loadable(tiny_run, published, step):
    out, old = published
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tiny_run), str(out), step],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert read_manifest(out) == old
    assert load_bundle(out).index_type == "flat"
    (stage,) = [out.parent / n for n in _leftovers(out)]
    assert STAGING_MARKER in stage.name
    with pytest.raises(BundleError, match="staging folder of an interrupted build"):
        load_bundle(stage)
    # the next build of the same destination removes the dead build's staging folder
    assert clean_stale_staging(out) == [stage]


def test_sigkill_on_first_build_leaves_no_bundle(tiny_run, tmp_path):
    out = tmp_path / "fresh"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tiny_run), str(out), "publish"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    with pytest.raises(BundleError):
        load_bundle(out)


def test_live_builds_staging_is_not_cleaned(tmp_path):
    out = tmp_path / "b"
    live = tmp_path / f".b{STAGING_MARKER}{os.getpid()}-abcd"
    live.mkdir()
    assert clean_stale_staging(out) == []
    assert live.exists()


def test_manifest_is_written_last(tiny_run, tmp_path, monkeypatch):
    """When the manifest is written, every other file is already complete in the folder."""
    seen = {}
    real = build_mod.write_manifest

    def spy(folder, manifest):
        seen["files"] = sorted(p.name for p in Path(folder).iterdir())
        return real(folder, manifest)

    monkeypatch.setattr(build_mod, "write_manifest", spy)
    out, m = build_bundle(tiny_run, tmp_path / "b", BuildConfig(index="flat"), progress=False)
    assert MANIFEST_NAME not in seen["files"]
    assert sorted(m.files) == seen["files"]
    assert json.loads((out / MANIFEST_NAME).read_text()) == m.model_dump(mode="json")
