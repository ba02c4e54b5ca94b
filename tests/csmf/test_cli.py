"""The ``csmf`` command itself: help that keeps its text, ``--version``, usage errors (exit 2)
before any heavy work, one exit code for bad input across subcommands."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from importlib.metadata import version
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from csmf.cli import COMMANDS, config_options, invoked_command, main, new_app
from csmf.errors import ConfigError


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


@dataclass(frozen=True)
class _Demo:
    size: int = field(metadata={"help": "required size"})
    kind: str = field(default="ivf", metadata={"help": "which", "choices": ("flat", "ivf")})
    limit: int | None = field(default=None, metadata={"help": "optional limit"})
    columns: tuple[str, ...] | None = field(default=None, metadata={"help": "comma-separated"})
    fast: bool = field(default=False, metadata={"help": "a flag"})
    check: bool = field(default=True, metadata={"help": "on by default"})

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"size must be >= 1, got {self.size}")


def test_config_options_are_the_dataclass_fields():
    seen = []

    @config_options(_Demo)
    def demo(out: Annotated[str, typer.Option(help="where")] = "x", *, config: _Demo) -> None:
        seen.append((out, config))

    app = new_app()
    app.command()(demo)
    runner = CliRunner()
    res = runner.invoke(app, ["--size", "3"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == ("x", _Demo(size=3))
    argv = ["--size", "2", "--kind", "flat", "--limit", "7", "--columns", "a, b", "--fast"]
    res = runner.invoke(app, [*argv, "--no-check", "--out", "y"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == ("y", _Demo(2, "flat", 7, ("a", "b"), True, False))
    assert runner.invoke(app, ["--size", "1", "--columns", ""]).exit_code == 0
    assert seen[-1][1].columns == ()  # '' = none, distinct from the default (None)
    help_text = runner.invoke(app, ["--help"]).output
    for f in fields(_Demo):
        assert "--" + f.name.replace("_", "-") in help_text and f.metadata["help"] in help_text
    for argv, message in [
        ([], "Missing option '--size'"),
        (["--size", "0"], "error: size must be >= 1, got 0"),  # the dataclass's validation
        (["--size", "1", "--kind", "hnsw"], "'hnsw' is not one of 'flat', 'ivf'"),
        (["--size", "1.5"], "Invalid value for '--size'"),
    ]:
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and message in res.output, (argv, res.output)


@pytest.mark.parametrize(
    ("argv", "cls"),
    [(["build-index", "--help"], "BuildConfig"), (["data", "synthetic", "--help"], "Synth")],
)
def test_build_and_data_options_come_from_their_configs(capsys, argv, cls):
    from index_builder.config import BuildConfig
    from trainer.data.synthetic import SyntheticConfig

    config = {"BuildConfig": BuildConfig, "Synth": SyntheticConfig}[cls]
    _, out, _ = _run(capsys, *argv)
    flat, squeezed = " ".join(out.split()), "".join(out.split())  # click wraps at hyphens
    for f in fields(config):
        assert "--" + f.name.replace("_", "-") + " " in flat, f.name
        assert "".join(f.metadata["help"].split()) in squeezed, f.name


def test_invoked_command_names_the_options_given():
    got = []
    app = new_app()

    @app.command()
    def run(
        ctx: typer.Context,
        n: int = 1,
        tag: Annotated[list[str] | None, typer.Option("--set")] = None,
        fast: bool = False,
        name: str = "a",
    ) -> None:
        got.append(invoked_command(ctx))

    @app.command()
    def other() -> None:
        pass

    res = CliRunner().invoke(app, ["run", "--n", "3", "--set", "a=1", "--set", "b=x y", "--fast"])
    assert res.exit_code == 0, res.output
    assert got == ["root run --n 3 --set a=1 --set 'b=x y' --fast"]  # defaults left out
