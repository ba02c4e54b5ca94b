"""The ``csmf`` command itself: help that keeps its text, ``--version``, usage errors (exit 2)
before any heavy work, one exit code for bad input across subcommands."""

from __future__ import annotations

import socket
from importlib.metadata import version

import pytest

from csmf.cli import COMMANDS, main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out.out, out.err


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"csmf {version('csmf-retrieval')}"
    assert "--version" in _run(capsys, "--help")[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_no_type_noise_or_completion_clutter(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0 and "Usage: csmf " + command in out
    assert "<bool>" not in out and "install-completion" not in out and "╭" not in out


@pytest.mark.parametrize(
    ("argv", "bracketed"),
    [
        (["train", "--help"], "[features], [model], [cascade]"),
        (["data", "ml-100k", "--help"], "[default: $CSMF_CACHE_DIR or ~/.cache/csmf]"),
    ],
)
def test_help_keeps_bracketed_text(capsys, argv, bracketed):
    _, out, _ = _run(capsys, *argv)
    assert bracketed in " ".join(out.split())  # as written, modulo line wrapping


def test_serve_bad_port_is_a_usage_error_before_the_bundle(capsys, tmp_path):
    missing = str(tmp_path / "no-bundle")  # never looked at: the port is checked first
    code, _, err = _run(capsys, "serve", "--bundle", missing, "--port", "-5")
    assert code == 2 and "-5 is not a TCP port; expected 1-65535" in err
    assert "no bundle" not in err
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, _, err = _run(capsys, "serve", "--bundle", missing, "--port", str(port))
    assert code == 2 and f"port {port} is already in use" in err and "no bundle" not in err
    code, _, err = _run(capsys, "serve", "--bundle", missing, "--log-level", "loud")
    assert code == 2 and "'loud' is not one of" in err


def test_usage_errors_exit_2_in_every_command(capsys, tmp_path):
    cases = [
        ["build-index", "--run", str(tmp_path / "no-run"), "--out", str(tmp_path / "b")],
        ["train", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "r")],
        ["inspect", str(tmp_path / "no-bundle")],
        ["build-index", "--run", str(tmp_path), "--out", str(tmp_path / "b"), "--index", "lsh"],
        ["no-such-command"],
    ]
    for argv in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert "Traceback" not in err and err.strip(), argv
