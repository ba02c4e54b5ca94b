"""``csmf train`` and ``csmf eval``. The top-level ``csmf`` command mounts :func:`train` and
:func:`evaluate`; ``python -m trainer.cli train ...`` runs the same functions through :data:`app`.

Bad configuration or data ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from csmf.cli import fail, new_app
from csmf.errors import ConfigError, CsmfError

app = new_app(no_args_is_help=True, help="CSMF trainer: train, eval, tune.")


@app.command("train")
def train(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML config: [features], [model], [cascade], ... [default: configs/ml-100k.toml]",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset folder (csmf data ...). [default: data/ml-100k]"),
    ] = None,
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
            metavar="KEY=VALUE",
            help="Override a config key, e.g. --set cascade.tau=0.5 --set train.epochs=[8,8,4] "
            "(value parsed as TOML). Repeatable.",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show per-stage progress bars.")
    ] = True,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the interrupted run in this folder from its last epoch/stage "
            "checkpoint (its own config and dataset; no --config/--data/--set/--seed).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite a run folder that already holds a run, or write into an --out folder "
            "that holds something else.",
        ),
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", min=1, help="Data-parallel processes on this machine (launches torchrun)."
        ),
    ] = 1,
    from_: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Warm start: continue this finished run on --data's events newer than what it "
            "trained on; tables grow for new users and items, each stage fine-tunes only its own "
            "units ([warm] settings). Takes the run's config (--set may change it; a --config "
            "must have the same features and towers). The run is only read.",
        ),
    ] = None,
) -> None:
    """Train the CSMF cascade (train → CPP → AR → freeze per objective) into a run folder."""
    from csmf.out_folder import check_out

    if from_ is not None:
        _warm_start(from_, config, data, out, seed, set_, progress, resume, force, nproc)
        return
    if resume is None:
        try:
            check_out(out, "run", force)
        except CsmfError as exc:
            fail(exc)
    if nproc > 1:
        _launch_torchrun(nproc, config, data, out, seed, set_, progress, resume, force)
        return
    from trainer.config import load_config
    from trainer.distributed import init_from_env, shutdown
    from trainer.pipeline import resolve_device, resume_config, resume_run, train_run

    try:
        if resume is not None:
            if config is not None or data is not None or set_ or seed is not None or force:
                raise ConfigError(
                    "--resume takes the run's own config and dataset; drop --config, --data, "
                    "--set, --seed and --force"
                )
            cfg = None
        else:
            overrides = list(set_ or [])
            if seed is not None:
                overrides.append(f"train.seed={seed}")
            cfg = load_config(config or DEFAULT_CONFIG, overrides)
        device_name = (cfg or resume_config(resume)).train.device
        dist = init_from_env(resolve_device(device_name))
        log = typer.echo if dist.main else _quiet
        try:
            if resume is not None:
                path, metrics = resume_run(
                    resume, log=log, progress=progress and dist.main, dist=dist
                )
            else:
                path, metrics = train_run(
                    cfg, data or DEFAULT_DATA, out, log=log, progress=progress and dist.main,
                    force=force, dist=dist,
                )  # fmt: skip
        finally:
            shutdown(dist)
    except CsmfError as exc:
        fail(exc)
    if not dist.main:
        return
    objectives = load_checkpoint_objectives(path)
    slices = " | ".join(
        f"{o} {n}" for o, n in zip(objectives, metrics["output_slices"], strict=True)
    )
    typer.echo(
        f"trained {len(objectives)} stages in {metrics['seconds']:.0f}s "
        f"(output slices {slices}); checkpoint at {path}"
    )


def _warm_start(
    prev: Path,
    config: Path | None,
    data: Path | None,
    out: Path,
    seed: int | None,
    set_: list[str] | None,
    progress: bool,
    resume: Path | None,
    force: bool,
    nproc: int,
) -> None:
    """``csmf train --from RUN --data DATA --out NEW``."""
    from csmf.checkpoint import load_checkpoint
    from csmf.out_folder import check_out
    from trainer.config import config_from_dict, load_config
    from trainer.pipeline import warm_run

    try:
        if resume is not None or nproc > 1:
            raise ConfigError("--from runs in one process and cannot be combined with --resume")
        if data is None:
            raise ConfigError("--from needs --data: the dataset folder holding the new events")
        check_out(out, "run", force)
        overrides = list(set_ or [])
        if seed is not None:
            overrides.append(f"train.seed={seed}")
        ckpt = load_checkpoint(prev)
        if config is not None:
            cfg = load_config(config, overrides)
        else:
            cfg = config_from_dict(ckpt.train_config, overrides)
        path, metrics = warm_run(
            prev, data, out, cfg, log=typer.echo, progress=progress, force=force
        )
    except CsmfError as exc:
        fail(exc)
    grown = metrics["warm_start"]["grown_rows"]
    typer.echo(
        f"warm start done in {metrics['seconds']:.0f}s (+{grown['user.id']:,} users, "
        f"+{grown['item.id']:,} items); checkpoint at {path}"
    )


@app.command("extend")
def extend(
    run: Annotated[Path, typer.Argument(help="Finished run folder to extend (only read).")],
    objective: Annotated[
        str, typer.Option("--objective", help="Name of the new objective, e.g. cart or dwell.")
    ],
    label: Annotated[
        str,
        typer.Option("--label", help="Bool events column marking its positives, e.g. carted."),
    ],
    out: Annotated[Path, typer.Option("--out", help="New run folder to write.")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset folder with the label column. [default: the run's]"),
    ] = None,
    weight: Annotated[
        float, typer.Option("--weight", help="The new objective's eval.weights entry.")
    ] = 1.0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Config override, e.g. train.epochs=8."),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite --out if it holds a run.")
    ] = False,
) -> None:
    """Append an objective to a trained cascade on the units its last stage left unowned
    (cascade.last_tau > 0); every earlier objective's parameters and scores stay bit-identical."""
    from csmf.checkpoint import load_checkpoint
    from csmf.out_folder import check_out
    from trainer.extend import extend_run

    try:
        check_out(out, "run", force)
        data = data or Path(load_checkpoint(run).dataset)
        path, metrics = extend_run(
            run, objective, label, data, out, overrides=list(set_ or []), log=typer.echo,
            progress=progress, force=force,
        )  # fmt: skip
    except CsmfError as exc:
        fail(exc)
    names = [rec["objective"] for rec in metrics["stages"]]
    slices = " | ".join(f"{o} {n}" for o, n in zip(names, metrics["output_slices"], strict=True))
    typer.echo(f"extended with {objective!r} (output slices {slices}); checkpoint at {path}")


DEFAULT_CONFIG = Path("configs/ml-100k.toml")
DEFAULT_DATA = Path("data/ml-100k")


def _quiet(_: str) -> None:
    pass


def load_checkpoint_objectives(path: Path) -> tuple[str, ...]:
    from csmf.checkpoint import load_checkpoint

    return load_checkpoint(path).objectives


def _launch_torchrun(
    nproc: int,
    config: Path | None,
    data: Path | None,
    out: Path,
    seed: int | None,
    set_: list[str] | None,
    progress: bool,
    resume: Path | None,
    force: bool,
) -> None:
    """``csmf train --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m trainer.cli
    train ...`` (same options minus --nproc); exits with torchrun's status."""
    import subprocess
    import sys

    args = ["train", "--progress" if progress else "--no-progress"]
    if resume is not None:
        args += ["--resume", str(resume)]
    else:
        args += ["--out", str(out)]
    for flag, value in (("--config", config), ("--data", data), ("--seed", seed)):
        if value is not None:
            args += [flag, str(value)]
    for item in set_ or []:
        args += ["--set", item]
    if force:
        args.append("--force")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "trainer.cli", *args]  # fmt: skip
    typer.echo("launching: " + " ".join(cmd[1:]), err=True)
    code = subprocess.call(cmd)
    if code:
        raise typer.Exit(code)


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
        fail(exc)
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
    from csmf.admin_client import scenario_version
    from trainer.tune import TUNE_NAME, TuneError, apply_scenario, parse_values, summary, tune_run

    try:
        if apply and not (url and token):
            raise TuneError("--apply needs --url of a running service and --token (admin)")
        version = scenario_version(url, token, apply) if apply else 0  # before any work
        doc = tune_run(run, objectives.split(","), metric, n, parse_values(values), prefer, out)
        typer.echo(summary(doc))
        if apply:
            s = apply_scenario(doc, apply, url, token, version)
            typer.echo(f"applied scenario {apply!r} version {s['version']} at {url}")
    except CsmfError as exc:
        fail(exc)
    where = Path(out or run)
    typer.echo(f"wrote {where / TUNE_NAME}" + (f" and {doc['plot']}" if doc["plot"] else ""))


if __name__ == "__main__":
    app()
