"""The ``csmf`` command: one entry point, one subcommand per job.

This module only assembles; each package owns its subcommands and their options
(``trainer.data.cli``, ``trainer.cli``, ``index_builder.cli``, ``service.cli``). It is the one
module in ``csmf/`` allowed to import the other packages, and it does so lazily — only the
subcommand being run is imported, so ``csmf serve`` never loads the trainer and ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, NoReturn

import click
import typer
from typer.main import get_command

USAGE_ERROR = 2  # bad options, bad config or data: click's own code for usage errors


# `--seeds N` means the same in every command that repeats runs over seeds: N runs, seeds 0..N-1.
Seeds = Annotated[
    int,
    typer.Option(
        "--seeds", min=1, help="Number of seeds: one run per seed 0..N-1 (in every csmf command)."
    ),
]


def invoked_command() -> str:
    """The running command as a user would type it again — its path (``csmf bench sensitivity
    sweep``) and every option given on the command line, defaults left out — for results files
    to name what made them."""
    import shlex

    from click.core import ParameterSource

    ctx = click.get_current_context()
    parts = [ctx.command_path]  # "csmf bench sensitivity sweep", "python -m trainer.report"
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            opts = param.opts if value else param.secondary_opts
            parts += opts[:1]
            continue
        for v in value if param.multiple else [value]:
            parts += [param.opts[0], shlex.quote(str(getattr(v, "value", v)))]
    return " ".join(parts)


def new_app(**kwargs) -> typer.Typer:
    """A typer app as every csmf command builds it: click's plain help (rich markup would eat
    bracketed text such as ``[exposure, click]`` and print a ``<bool>`` per flag) and no shell
    completion options."""
    return typer.Typer(add_completion=False, rich_markup_mode=None, **kwargs)


def fail(message: object) -> NoReturn:
    """One ``error: ...`` line on stderr and exit code 2 — every csmf command ends this way on a
    bad option, config or dataset (a usage error, as click's own)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def package_version() -> str:
    try:
        return version("csmf-retrieval")
    except PackageNotFoundError:  # a source tree without an install
        return "unknown (not installed)"


# subcommand → (module, attribute, kind). "group" attributes are typer.Typer apps.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("trainer.data.cli", "app", "group"),
    "train": ("trainer.cli", "train", "command"),
    "eval": ("trainer.cli", "evaluate", "command"),
    "tune": ("trainer.cli", "tune", "command"),
    "bench": ("trainer.bench_cli", "app", "group"),
    "build-index": ("index_builder.cli", "build_index", "command"),
    "inspect": ("index_builder.cli", "inspect", "command"),
    "serve": ("service.cli", "serve", "command"),
}
HELP = {
    "data": "Fetch/convert datasets: MovieLens-100K, synthetic cascades.",
    "train": "Train the CSMF cascade (exposure → click → conversion) into a run folder.",
    "eval": "Recall@N / nDCG@N of every view and the fused score, next to popularity.",
    "tune": "Pareto front of weight triplets on validation; apply one as a scenario.",
    "bench": "Benchmarks: `csmf bench quality` (baselines table), `csmf bench sensitivity` (sweeps).",
    "build-index": "Encode the catalogue, build FAISS, verify recall, publish a bundle.",
    "inspect": "Print a bundle's manifest and verify its checksums.",
    "serve": "Serve a bundle over HTTP (FastAPI + uvicorn).",
}


NEEDS_TORCH = {"train", "eval", "tune", "bench", "build-index"}


def _load(name: str):
    module, attr, kind = COMMANDS[name]
    obj = getattr(importlib.import_module(module), attr)
    if kind == "group":
        return get_command(obj)
    app = new_app()
    app.command(name=name)(obj)
    return get_command(app)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        print(f"csmf {package_version()}")
        raise SystemExit(0)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
                file=sys.stderr,
            )
        print(
            "usage: csmf COMMAND [OPTIONS]   (csmf COMMAND --help for its options; "
            "csmf --version)\n\ncommands:"
        )
        for n in COMMANDS:
            print(f"  {n:<12} {HELP[n]}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    try:
        _load(argv[0]).main(args=argv[1:], prog_name=f"csmf {argv[0]}")
    except ModuleNotFoundError as exc:  # on import or inside the command (lazy imports)
        if exc.name != "torch" or argv[0] not in NEEDS_TORCH:
            raise
        print(
            f"error: `csmf {argv[0]}` needs PyTorch, which this install does not have (serving "
            "does not): pip install torch==2.13.0, then pip install 'csmf-retrieval[train]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
