"""``--out`` never replaces what its command did not write: a file, a folder of other
things (without --force), an unwritable place — one ``error:`` line, exit 2, before any work — for
`csmf build-index`, `csmf train`, `csmf data ml-100k` and `csmf data synthetic`, run as a user
runs them (subprocesses; the other refusals of each command in process, through the same
``csmf.cli.main``). What each command writes itself is still replaced as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from csmf.cli import main
from csmf.out_folder import OutFolderError, check_out

ROOT = Path(__file__).resolve().parents[2]
SYN = ["--users", "20", "--items", "30", "--exposures", "600", "--seed", "1"]


def _csmf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csmf.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``csmf ARGS`` through ``csmf.cli.main`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([*map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exc.value.code, out, err)


def _one_error_line(p: subprocess.CompletedProcess, *needles: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: --out "), p.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def targets(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("precious\n")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me\n")
    return readme, other


def _commands(tmp_path, tiny_run):
    missing = tmp_path / "no-data"  # never read: --out is checked first
    return {
        "build-index": ["build-index", "--run", tiny_run, "--index", "flat", "--quiet"],
        "train": ["train", "--data", missing, "--no-progress"],
        "ml-100k": ["data", "ml-100k", "--cache-dir", tmp_path / "cache"],
        "synthetic": ["data", "synthetic", *SYN],
    }


@pytest.mark.slow
def test_out_refuses_files_foreign_folders_and_unwritable_places(
    tmp_path, tiny_run, targets, capsys
):
    readme, other = targets
    for name, argv in _commands(tmp_path, tiny_run).items():
        p = _csmf(*argv, "--out", readme)  # as a user runs it
        _one_error_line(p, "is a file", "never replaces a file")
        p = _in_process(capsys, *argv, "--out", other)
        _one_error_line(p, "1 entries (todo.txt)", "--force")
        p = _in_process(capsys, *argv, "--out", "/proc/nope")
        _one_error_line(p, "cannot write in /proc")
        p = _in_process(capsys, *argv, "--out", readme / "sub")
        _one_error_line(p, f"{readme} is a file")
        assert readme.read_text() == "precious\n", name
        assert (other / "todo.txt").read_text() == "keep me\n" and len(os.listdir(other)) == 1
    assert not (tmp_path / "cache").exists()  # ml-100k fetched nothing
    assert not (tmp_path / "no-data").exists()


@pytest.mark.slow
def test_out_still_replaces_its_own_kind_and_force_writes_into_a_foreign_folder(
    tmp_path, tiny_run, targets
):
    _, other = targets
    ds = tmp_path / "syn"
    assert _csmf("data", "synthetic", *SYN, "--out", ds).returncode == 0
    p = _csmf("data", "synthetic", *SYN, "--out", ds)  # a dataset there: replaced
    assert p.returncode == 0, p.stderr
    bundle = tmp_path / "bundle"
    argv = ["build-index", "--run", tiny_run, "--index", "flat", "--quiet", "--out", bundle]
    assert _csmf(*argv).returncode == 0
    p = _csmf(*argv)  # a bundle there: replaced atomically
    assert p.returncode == 0 and (bundle / "manifest.json").exists(), p.stderr
    p = _csmf(*argv[:-1], other, "--force")
    assert p.returncode == 0 and (other / "manifest.json").exists(), p.stderr
    assert not (other / "todo.txt").exists()  # --force: the folder became the bundle


def test_check_out_in_process(tmp_path):
    check_out(tmp_path / "new" / "deeper", "run")  # created later, parents too
    check_out(tmp_path, "run", force=True)
    (tmp_path / "x").write_text("")
    with pytest.raises(OutFolderError, match="no run in it"):
        check_out(tmp_path, "run")
    (tmp_path / "checkpoint.pt").write_text("")
    check_out(tmp_path, "run")  # a run: train_run's own check decides (--force to overwrite)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutFolderError, match="broken symlink"):
        check_out(tmp_path / "dangling", "bundle")
    with pytest.raises(ValueError, match="kind must be one of"):
        check_out(tmp_path, "model")
