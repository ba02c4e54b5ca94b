"""The ``csmf`` command: one entry point, one subcommand per job.

This module only assembles; each package owns its subcommands and their options
(``trainer.data.cli``, ``trainer.cli``, ``index_builder.cli``, ``service.cli``). It is the one
module in ``csmf/`` allowed to import the other packages, and it does so lazily — only the
subcommand being run is imported, so ``csmf serve`` never loads the trainer and ``--help`` is fast.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from types import UnionType
from typing import Annotated, Any, NoReturn, Union, get_args, get_origin, get_type_hints

import typer
from typer.main import get_command

from csmf.errors import ConfigError

USAGE_ERROR = 2  # bad options, bad config or data: click's own code for usage errors


# `--seeds N` means the same in every command that repeats runs over seeds: N runs, seeds 0..N-1.
Seeds = Annotated[
    int,
    typer.Option(
        "--seeds", min=1, help="Number of seeds: one run per seed 0..N-1 (in every csmf command)."
    ),
]


def config_options(cls: type, *, skip: tuple[str, ...] = ()) -> Callable:
    """Decorator: give a command one option per field of the frozen config dataclass ``cls``
    (name, type, default, ``metadata["help"]``, ``metadata["choices"]``) instead of copying the
    fields into the command by hand; the command receives ``config=cls(...)`` built from them
    (a ConfigError from its validation → :func:`fail`). A field without a default is a required
    option; a ``tuple[str, ...]`` field is one comma-separated string ('' = empty); a boolean
    defaulting to false is a plain flag (``--opq``), one defaulting to true ``--x/--no-x``."""
    hints = get_type_hints(cls)
    spec = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def option(f: dataclasses.Field) -> inspect.Parameter:
        kind, optional = hints[f.name], False
        if get_origin(kind) in (Union, UnionType) and type(None) in get_args(kind):
            kind, optional = next(a for a in get_args(kind) if a is not type(None)), True
        default = f.default if f.default is not dataclasses.MISSING else ...
        flag = "--" + f.name.replace("_", "-")
        decl: list[str] = []
        if kind is bool:
            decl = [flag] if default is False else [f"{flag}/--no-{flag[2:]}"]
        elif get_origin(kind) is tuple:
            kind = str
            default = None if default is None else ",".join(default)
        elif "choices" in f.metadata:
            kind = StrEnum(f.name, [(c, c) for c in f.metadata["choices"]])
            default = default if default is ... else kind(default)
        if optional:
            kind = kind | None
        info = typer.Option(*decl, help=f.metadata.get("help"), show_default=default is not None)
        return inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[kind, info],
        )

    def value(f: dataclasses.Field, v: Any) -> Any:
        if isinstance(v, StrEnum):
            return v.value
        if get_origin(hints[f.name]) is tuple or tuple in map(get_origin, get_args(hints[f.name])):
            return None if v is None else tuple(c.strip() for c in v.split(",") if c.strip())
        return v

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "config"]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {f.name: value(f, kwargs.pop(f.name)) for f in spec}
            try:
                config = cls(**values)
            except ConfigError as exc:
                fail(exc)
            return fn(**kwargs, config=config)

        params = own + [option(f) for f in spec]
        command.__signature__ = sig.replace(parameters=params)  # what typer reads
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the new signature, not fn's
        return command

    return decorate


def invoked_command(ctx: typer.Context) -> str:
    """The running command as a user would type it again — its path (``csmf bench sensitivity
    sweep``) and every option given on the command line, defaults left out — for results files
    to name what made them. ``ctx``: the command's ``typer.Context`` parameter."""
    import shlex

    parts = [ctx.command_path]  # "csmf bench sensitivity sweep", "python -m bench.harness.report"
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name != "COMMANDLINE":
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
    "extend": ("trainer.cli", "extend", "command"),
    "eval": ("trainer.cli", "evaluate", "command"),
    "tune": ("trainer.cli", "tune", "command"),
    "bench": ("bench.harness.cli", "app", "group"),
    "build-index": ("index_builder.cli", "build_index", "command"),
    "inspect": ("index_builder.cli", "inspect", "command"),
    "export": ("index_builder.cli", "export_app", "group"),
    "index": ("index_builder.items_cli", "index_app", "group"),
    "items": ("index_builder.items_cli", "items_app", "group"),
    "serve": ("service.cli", "serve", "command"),
    "daily": ("daily.cli", "daily", "command"),
}
HELP = {
    "data": "Fetch/convert datasets: MovieLens-100K, synthetic cascades.",
    "train": "Train the CSMF cascade (exposure → click → conversion) into a run folder.",
    "extend": "Add an objective to a trained cascade; earlier objectives' scores stay bit-identical.",
    "eval": "Recall@N / nDCG@N of every view and the fused score, next to popularity.",
    "tune": "Pareto front of weight triplets on validation; apply one as a scenario.",
    "bench": "Benchmarks: `csmf bench quality` (baselines table), `csmf bench sensitivity` (sweeps).",
    "build-index": "Encode the catalogue, build FAISS, verify recall, publish a bundle.",
    "inspect": "Print a bundle's manifest and verify its checksums.",
    "export": "Export a bundle's user tower: `csmf export onnx BUNDLE OUT`.",
    "index": "Item writes on a bundle: `upsert`, `delete` (item log), `compact` (new bundle).",
    "items": "`csmf items encode`: item rows → vectors with the bundle's item tower.",
    "serve": "Serve a bundle over HTTP (FastAPI + uvicorn).",
    "daily": "One scheduled update: new events → train → quality gate → bundle → reload replicas.",
}


NEEDS_TORCH = {"train", "extend", "eval", "tune", "bench", "build-index", "export", "daily"}


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
