"""``csmf train`` and ``csmf eval``. The top-level ``csmf`` command mounts :func:`train` and
:func:`evaluate`; ``python -m trainer.cli train ...`` runs the same functions through :data:`app`.

Bad configuration or data ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from csmf.errors import CsmfError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="CSMF trainer: train, eval, tune."
)


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.command("train")
def train(
    config: Annotated[
        Path, typer.Option("--config", help="TOML config: [features], [model], [cascade], ...")
    ] = Path("configs/ml-100k.toml"),
    data: Annotated[Path, typer.Option("--data", help="Dataset folder (csmf data ...).")] = Path(
        "data/ml-100k"
    ),
    out: Annotated[
        Path, typer.Option("--out", help="Run folder to write (checkpoint.pt, train_metrics.json).")
    ] = Path("runs/ml-100k"),
    seed: Annotated[
        int | None, typer.Option("--seed", help="Overrides train.seed (init, batching, sampling).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config key, e.g. --set cascade.tau=0.5 --set train.epochs=[8,8,4] "
            "(value parsed as TOML). Repeatable.",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show per-stage progress bars.")
    ] = True,
) -> None:
    """Train the CSMF cascade (train → CPP → AR → freeze per objective) into a run folder."""
    from trainer.config import load_config
    from trainer.pipeline import train_run

    overrides = list(set_ or [])
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    try:
        cfg = load_config(config, overrides)
        path, metrics = train_run(cfg, data, out, log=typer.echo, progress=progress)
    except CsmfError as exc:
        _fail(exc)
    slices = " | ".join(
        f"{o} {n}" for o, n in zip(cfg.objectives, metrics["output_slices"], strict=True)
    )
    typer.echo(
        f"trained {len(cfg.objectives)} stages in {metrics['seconds']:.0f}s "
        f"(output slices {slices}); checkpoint at {path}"
    )


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="Run folder written by csmf train.")],
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Fused-score weights in cascade order, e.g. 1,1.8,1.2."),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", min=1, help="Cut-off N of Recall@N/nDCG@N.")
    ] = None,
) -> None:
    """Recall@N / nDCG@N on test clicks and conversions: every view, the fused score, popularity."""
    from trainer.pipeline import EVAL_NAME, eval_run, format_table

    try:
        result = eval_run(run, weights, n)
    except CsmfError as exc:
        _fail(exc)
    typer.echo(format_table(result))
    typer.echo(f"wrote {Path(run) / EVAL_NAME}")


@app.command("tune")
def tune(
    run: Annotated[Path, typer.Option("--run", help="Run folder written by csmf train.")],
    objectives: Annotated[
        str, typer.Option("--objectives", help="The two objectives of the front, x,y.")
    ] = "click,conversion",
    metric: Annotated[str, typer.Option("--metric", help="recall or ndcg (@N).")] = "recall",
    n: Annotated[
        int | None, typer.Option("--n", min=1, help="Cut-off N (default: the run's eval.n).")
    ] = None,
    values: Annotated[
        str,
        typer.Option("--values", help="Values each weight takes; the grid is their product."),
    ] = "0,0.5,1,1.5,2,3,5",
    prefer: Annotated[
        float,
        typer.Option(
            "--prefer",
            help="Chosen front point: maximises (1-p)·x/max x + p·y/max y; 0 favours x, 1 y.",
        ),
    ] = 0.5,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for tune.json/tune.png (default: the run).")
    ] = None,
    apply: Annotated[
        str | None,
        typer.Option("--apply", help="Put the chosen point as this scenario (needs --url)."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Running service for --apply, e.g. http://127.0.0.1:8000."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="CSMF_ADMIN_TOKEN", help="Admin token (or CSMF_ADMIN_TOKEN)."
        ),
    ] = None,
) -> None:
    """Pareto front of weight triplets on the VALIDATION split; optionally apply one as a scenario."""
    from trainer.tune import TUNE_NAME, TuneError, apply_scenario, parse_values, summary, tune_run

    try:
        if apply and not (url and token):
            raise TuneError("--apply needs --url of a running service and --token (admin)")
        doc = tune_run(run, objectives.split(","), metric, n, parse_values(values), prefer, out)
        typer.echo(summary(doc))
        if apply:
            s = apply_scenario(doc, apply, url, token)
            typer.echo(f"applied scenario {apply!r} version {s['version']} at {url}")
    except CsmfError as exc:
        _fail(exc)
    where = Path(out or run)
    typer.echo(f"wrote {where / TUNE_NAME}" + (f" and {doc['plot']}" if doc["plot"] else ""))


if __name__ == "__main__":
    app()
