"""``csmf daily`` (mounted by csmf/cli.py; also ``python -m daily.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from csmf.cli import config_options, fail, new_app
from csmf.errors import ConfigError, CsmfError
from daily.gate import GateConfig


@config_options(GateConfig)
def daily(
    state: Annotated[
        Path,
        typer.Option(
            "--state",
            help="State folder: runs/, bundles/ (bundles/current = the serving bundle), data/ "
            "snapshots, status.json. Created on the first update.",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Dataset folder to read the events from: the service's event log folder "
            "(events/part-*.parquet, CSMF_EVENT_LOG_DIR) with users.parquet and items.parquet "
            "beside it, or any dataset folder.",
        ),
    ],
    train_config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Training config (TOML). Needed on the first update (trained from scratch); "
            "later updates continue with the serving run's own config unless one is given "
            "(its [features] must then be the serving model's).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a training config key (as csmf train)."
        ),
    ] = None,
    build: Annotated[
        list[str] | None,
        typer.Option(
            "--build",
            metavar="KEY=VALUE",
            help="A csmf build-index option as a BuildConfig field, e.g. --build index=hnsw "
            "--build recall_floor=0.9 (value parsed as TOML). Repeatable. [default: index=flat]",
        ),
    ] = None,
    replicas: Annotated[
        str,
        typer.Option("--replicas", help="Comma-separated base URLs of the replicas to reload."),
    ] = "",
    replicas_dns: Annotated[
        str | None,
        typer.Option(
            "--replicas-dns",
            help="HOST:PORT whose DNS answers one address per replica (a Kubernetes headless "
            "Service, a compose service name); resolved after the commit.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="CSMF_ADMIN_TOKEN", help="Admin token of the replicas."),
    ] = None,
    replica_state: Annotated[
        str | None,
        typer.Option(
            "--replica-state",
            help="The state folder's path as the replicas see it (their mount point), "
            "e.g. /models. [default: --state, absolute]",
        ),
    ] = None,
    reload_timeout: Annotated[
        float, typer.Option("--reload-timeout", help="Seconds one replica may take to reload.")
    ] = 300.0,
    keep: Annotated[
        int, typer.Option("--keep", help="Generations (run + bundle + data) kept on disk; >= 2.")
    ] = 3,
    period_s: Annotated[
        float,
        typer.Option(
            "--period-s",
            help="The latest period, in seconds of event time: the holdout both models are "
            "scored on (split.test_from = newest event - period), trained on by the next update.",
        ),
    ] = 86400.0,
    max_age_hours: Annotated[
        float,
        typer.Option(
            "--max-age-hours",
            help="Age of the serving model past which CsmfModelTooOld fires (exported as "
            "csmf_daily_max_model_age_seconds).",
        ),
    ] = 26.0,
    pushgateway: Annotated[
        str | None,
        typer.Option(
            "--pushgateway",
            envvar="CSMF_PUSHGATEWAY",
            help="Prometheus Pushgateway URL to push the status metrics to (they are always "
            "written to STATE/daily.prom too).",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bars while training.")
    ] = False,
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch",
            help="Retrain the whole cascade on every event instead of warm-starting the serving "
            "run (the gate still compares with it). Schedule it, e.g. weekly, to bound the chain "
            "of warm starts: bench/results/continual-ml-100k.md.",
        ),
    ] = False,
    *,
    config: GateConfig,
) -> None:
    """One update of the serving model: snapshot the new events, train (a warm start of the
    serving run on the events since; from scratch on the first day), refuse to publish when the
    candidate is worse than the serving model on the latest period by more than --margin, build
    and verify the bundle, point bundles/current at it, and ask every replica to reload it. Exit
    0 published (or nothing new: unchanged), 2 bad input (nothing trained), 3 refused by the
    gate, 4 published but a replica did not reload, 1 any other failure. Run it from cron, a
    Kubernetes CronJob or the compose service (deploy/)."""
    from daily.update import OK, DailyOptions, run_daily

    try:
        opts = DailyOptions(
            state=state, data=data, config=train_config, overrides=tuple(set_ or ()),
            gate=config, build=_build_config(build or []),
            replicas=tuple(u.strip() for u in replicas.split(",") if u.strip()),
            replicas_dns=replicas_dns, token=token, replica_state=replica_state,
            reload_timeout=reload_timeout, keep=keep, period_s=period_s,
            max_age_hours=max_age_hours,
            pushgateway=pushgateway, progress=progress, from_scratch=from_scratch,
        )  # fmt: skip
    except CsmfError as exc:
        fail(exc)
    outcome = run_daily(opts, log=lambda m: typer.echo(m, err=True))
    if outcome.code == OK:
        typer.echo(f"daily: {outcome.message}")  # published, or nothing new (unchanged)
        return
    typer.echo(f"error: {outcome.message}", err=True)
    raise typer.Exit(outcome.code)


def _build_config(items: list[str]):
    """``--build key=value`` items → a BuildConfig (index=flat unless given)."""
    import dataclasses
    import tomllib

    from index_builder.config import BuildConfig

    names = {f.name for f in dataclasses.fields(BuildConfig)}
    values: dict = {"index": "flat"}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ConfigError(
                f"--build expects KEY=VALUE with KEY a BuildConfig field ({', '.join(sorted(names))}), "
                f"got {item!r}"
            )
        try:
            values[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = text.strip()
        if isinstance(values[key], list):
            values[key] = tuple(values[key])
    try:
        return BuildConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"--build: {exc}") from None


app = new_app(help="The scheduled model update.")
app.command("daily")(daily)

if __name__ == "__main__":
    app()
