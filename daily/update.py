"""One ``csmf daily`` update: read new events → train (warm start from the serving run; from
scratch on the first day) → gate against the serving model on the latest period → build and
verify the bundle → commit → ask every replica to reload → report.

The latest period is the last ``--period-s`` seconds of the events (``split.test_from`` = the
newest event time − period + 1, the global time split): it is the holdout both models are scored
on, and the next update trains on it. The warm start fine-tunes on the train events after what
the serving run trained through (``trained_through``), so a period is learnt exactly once. No
new train events since then: the update changes nothing (exit 0, outcome ``unchanged``).

Everything runs in this one process, calling the trainer, the gate and the index builder as
functions: the update holds its state lock for its whole life (a killed process releases it),
bad input surfaces as a typed error before any training (exit 2, one line), the gate scores
models already in memory, and no step pays a second torch start-up. The steps' own commands
(``csmf train``, ``csmf eval``, ``csmf build-index``) stay what an operator runs by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from csmf.atomic import write_json
from csmf.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from csmf.errors import ConfigError, CsmfError
from daily.events import snapshot
from daily.gate import GateConfig, GateReport, format_report, run_gate
from daily.metrics import export, read_status, write_status
from daily.replicas import ReplicaError, ReplicaResult, check_urls, reload_all, resolve
from daily.state import State, StateError
from index_builder.config import BuildConfig

Log = Callable[[str], None]

# Exit codes (documented in docs/operations.md#the-daily-update).
OK, FAILED, BAD_INPUT, REFUSED, RELOAD_FAILED = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class DailyOptions:
    state: Path
    data: Path
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    gate: GateConfig = field(default_factory=GateConfig)
    build: BuildConfig = field(default_factory=lambda: BuildConfig(index="flat"))
    replicas: tuple[str, ...] = ()
    replicas_dns: str | None = None
    token: str | None = None
    replica_state: str | None = None  # STATE as the replicas see it (their mount point)
    reload_timeout: float = 300.0
    keep: int = 3
    period_s: float = 86400.0
    max_age_hours: float = 26.0
    pushgateway: str | None = None
    progress: bool = False
    from_scratch: bool = False  # retrain the cascade instead of warm-starting the serving run

    def __post_init__(self) -> None:
        if self.keep < 2:
            raise ConfigError(
                f"keep must be >= 2 (the serving model and the previous), got {self.keep}"
            )
        if not self.period_s > 0:
            raise ConfigError(f"period must be > 0 seconds, got {self.period_s}")
        if self.max_age_hours <= 0:
            raise ConfigError(f"max age must be > 0 hours, got {self.max_age_hours}")
        if (self.replicas or self.replicas_dns) and not self.token:
            raise ConfigError(
                "reloading replicas needs the admin token: --token or CSMF_ADMIN_TOKEN"
            )
        check_urls(self.replicas)


@dataclass
class Outcome:
    code: int
    message: str
    gen: str | None = None
    gate: GateReport | None = None
    replicas: list[ReplicaResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchanged: bool = False  # exit 0 without a new model (nothing new to learn)

    @property
    def name(self) -> str:
        if self.unchanged:
            return "unchanged"
        names = {OK: "published", REFUSED: "refused", RELOAD_FAILED: "reload_failed"}
        return names.get(self.code, "failed")


class BadInput(CsmfError, ValueError):
    """Raised to the CLI for problems found before any training (exit 2)."""


class NothingNew(CsmfError, ValueError):
    """No train events newer than what the serving model trained through (exit 0, unchanged)."""


def run_daily(opts: DailyOptions, log: Log = print) -> Outcome:
    """Run one update; never raises for an expected failure: the Outcome carries the exit code."""
    state = State(opts.state)
    try:
        state.lock()
    except StateError as exc:
        return Outcome(BAD_INPUT, str(exc))
    try:
        return _locked(state, opts, log)
    finally:
        state.unlock()


def _locked(state: State, opts: DailyOptions, log: Log) -> Outcome:
    started = time.time()
    status = read_status(state.status_path)
    steps: dict[str, float] = {}
    outcome = Outcome(FAILED, "")
    crash: Exception | None = None
    try:
        for r in state.recover():
            log(f"warning: {r.message()}")
            outcome.warnings.append(r.message())
        serving_gen, serving, cfg = _check_inputs(state, opts)
        outcome = _update(state, opts, log, serving_gen, serving, cfg, steps, outcome)
    except NothingNew as exc:
        outcome.code, outcome.message, outcome.unchanged = OK, str(exc), True
    except BadInput as exc:
        outcome.code, outcome.message = BAD_INPUT, str(exc)
    except CsmfError as exc:
        outcome.code, outcome.message = FAILED, f"update {outcome.gen} failed: {exc}"
    except Exception as exc:  # a bug or the machine (disk full): report it, then re-raise
        outcome.code, outcome.message = FAILED, f"update {outcome.gen} failed: {exc!r}"
        crash = exc
    if outcome.gen is not None and outcome.code == FAILED:
        _discard(state, outcome.gen)
    _report(state, opts, status, outcome, started, steps, log)
    if crash is not None:
        raise crash
    return outcome


def _check_inputs(state: State, opts: DailyOptions) -> tuple[str | None, Checkpoint | None, object]:
    """Everything that can be wrong with the inputs, before any training: the state's pointer,
    the serving run, the config, the data folder (columns, objectives, labels, positives in the
    latest period, something new since the serving run), the replicas. Returns the config to
    train with, its ``split.test_from`` set to the start of the latest period."""
    from trainer.config import config_from_dict, load_config
    from trainer.data.dataset import load_dataset
    from trainer.warm import warm_config

    try:
        serving_gen = state.current()
        serving = None
        if serving_gen is not None:
            path = state.run_of(serving_gen) / CHECKPOINT_NAME
            if not path.exists():
                raise StateError(
                    f"the serving bundle {state.bundle_of(serving_gen)} has no run "
                    f"({path} is missing): the gate has nothing to compare with"
                )
            serving = load_checkpoint(path)
        if opts.config is not None:
            cfg = load_config(opts.config, opts.overrides)
        elif serving is not None:
            cfg = config_from_dict(serving.train_config, opts.overrides)
        else:
            raise ConfigError(
                f"{state.root} has no serving model yet: the first update trains from scratch "
                "and needs --config"
            )
        if serving is not None:
            if cfg.features != serving.features:
                raise ConfigError(
                    "the config's [features] differ from the serving model's; a new feature "
                    "spec needs a new state folder (or drop --config to keep the serving model's)"
                )
            cfg = warm_config(serving, cfg)  # the same towers and cascade, too
        ds = load_dataset(opts.data, cfg.features, objectives=cfg.objectives)
        cfg = _latest_period(ds, cfg, opts.period_s, serving)
        resolve(opts.replicas, opts.replicas_dns)  # a DNS name that does not resolve fails here
    except NothingNew:
        raise
    except CsmfError as exc:
        raise BadInput(str(exc)) from None
    return serving_gen, serving, cfg


def _latest_period(ds, cfg, period_s: float, serving: Checkpoint | None):
    """``cfg`` with ``split.test_from`` at the start of the latest period of ``ds``; checks the
    period holds positives to score and that there is something new to train on."""
    from dataclasses import asdict, replace

    import numpy as np

    import csmf.objectives as funnel
    from csmf.errors import DataError
    from trainer.data.dataset import split_by_time

    if cfg.train.data == "stream":
        raise ConfigError(
            "csmf daily reads its events in memory (the global split and the warm start need "
            "them): set train.data = 'memory' (or 'auto')"
        )
    cfg = replace(cfg, train=replace(cfg.train, data="memory"))  # 'auto' could choose streaming
    ts = ds.events["timestamp"].to_numpy()
    newest = int(ts.max())
    test_from = int(np.floor(newest - period_s)) + 1
    if test_from <= int(ts.min()):
        raise DataError(
            f"{ds.root}: the latest period (--period-s {period_s:g}) covers every event (from "
            f"{int(ts.min())} to {newest}): nothing would be left to train on; shorten it"
        )
    cfg = replace(cfg, split=replace(cfg.split, test_from=test_from))
    split = split_by_time(ds.events, **asdict(cfg.split))
    since = serving.metrics.get("trained_through") if serving is not None else None
    if since is not None and test_from <= since:
        raise NothingNew(
            f"nothing new: the latest period starts at {test_from}, but the serving model "
            f"trained through {since}; the serving model stays"
        )
    new_train = int((ts[split.train] > (since if since is not None else -np.inf)).sum())
    if new_train == 0:
        raise NothingNew(
            f"nothing new: no train events in {ds.root} between {since} (what the serving model "
            f"trained through) and the latest period (from {test_from}); the serving model stays"
        )
    for o in funnel.FUNNEL:
        if o.column is None or o.name not in cfg.objectives:
            continue
        held = ds.events[o.column].to_numpy(zero_copy_only=False)[split.test]
        if not held.any():
            raise DataError(
                f"{ds.root}: the latest period (events from {test_from}, --period-s "
                f"{period_s:g}) has no {o.name} positives: nothing to score the models on; "
                "widen the period"
            )
    return cfg


def _update(state, opts, log, serving_gen, serving, cfg, steps, outcome) -> Outcome:
    from trainer.pipeline import train_run, warm_run

    gen = state.new_gen()
    outcome.gen = gen
    partial = state.start(gen)

    began: dict[str, float] = {}

    def step(name: str) -> None:
        state.mark(gen, name)
        began[name] = time.perf_counter()

    def done(name: str) -> None:
        steps[name] = time.perf_counter() - began[name]

    step("events")
    counts = snapshot(opts.data, state.data_of(gen))
    data = state.data_of(gen)
    done("events")
    log(f"events: snapshot of {opts.data} in {data} ({counts['files']} files)")

    step("train")
    period = f"latest period from {cfg.split.test_from} held out"
    if serving is None or opts.from_scratch:
        why = "--from-scratch" if serving is not None else "no serving model yet"
        log(f"train from scratch on {data} ({period}; {why})")
        train_run(cfg, data, partial / "run", log=log, progress=opts.progress)
    else:
        log(f"warm start from {state.run_of(serving_gen)} on {data} ({period})")
        warm_run(state.run_of(serving_gen), data, partial / "run", cfg, log, opts.progress)
    done("train")

    step("gate")
    candidate = load_checkpoint(partial / "run")
    report = run_gate(candidate, serving, data, opts.gate)
    write_json(partial / "run" / "gate.json", report.to_dict())
    outcome.gate = report
    done("gate")
    log(format_report(report))
    if not report.passed:
        kept = state.keep_refused(gen, partial / "run")
        state.finish(gen)
        outcome.code = REFUSED
        outcome.message = f"not published: {report.reason} (candidate kept in {kept})"
        return outcome

    step("build")
    bundle, manifest = _build(partial, opts)
    done("build")
    log(f"bundle {bundle}: model {manifest.model_version}, {manifest.item_count} items")

    step("publish")
    _publish(state, gen, partial)
    done("publish")
    log(f"published {gen}: {state.bundle_of(gen)} is now {state.bundles / 'current'}")

    step("reload")
    root = opts.replica_state or str(state.root.resolve())
    replica_bundle = f"{root.rstrip('/')}/bundles/{gen}"
    try:
        urls = resolve(opts.replicas, opts.replicas_dns)
    except ReplicaError as exc:  # published already: a reload problem, not a failed update
        urls, outcome.replicas = [], [ReplicaResult(opts.replicas_dns or "?", False, str(exc))]
    outcome.replicas += reload_all(
        urls, opts.token or "", replica_bundle, manifest.model_version, opts.reload_timeout
    )
    done("reload")
    for r in outcome.replicas:
        log(f"replica {r.url}: {'reloaded ' + r.detail if r.ok else 'FAILED: ' + r.detail}")
    failed = [r for r in outcome.replicas if not r.ok]
    state.finish(gen)
    if failed:
        outcome.code = RELOAD_FAILED
        outcome.message = (
            f"published {gen}, but {len(failed)} of {len(outcome.replicas)} replicas did not "
            "reload it "
            "(they keep serving their previous bundle; the others were not rolled back): "
            + "; ".join(f"{r.url}: {r.detail}" for r in failed)
        )
        return outcome
    protect = {gen} | ({serving_gen} if serving_gen else set())
    pruned = state.prune(opts.keep, protect)
    if pruned:
        log(f"removed old generations {', '.join(pruned)} (keeping {opts.keep})")
    outcome.code = OK
    outcome.message = (
        f"published {gen} (model {manifest.model_version}) and reloaded "
        f"{len(urls)} replica(s); serving bundle {state.bundles / 'current'}"
    )
    return outcome


def _build(partial: Path, opts: DailyOptions):
    from index_builder.build import build_bundle

    return build_bundle(partial / "run", partial / "bundle", opts.build, progress=opts.progress)


def _publish(state: State, gen: str, partial: Path) -> None:
    """Move the run and the bundle to their new names, verify the bundle there, commit."""
    import os

    from csmf.bundle import load_bundle

    os.replace(partial / "run", state.run_of(gen))
    os.replace(partial / "bundle", state.bundle_of(gen))
    load_bundle(state.bundle_of(gen), verify=True).close()  # checksums, dims, index loads
    state.commit(gen)


def _discard(state: State, gen: str) -> None:
    """A failed (not crashed) update: remove its partial work now rather than at the next run."""
    if state.partial(gen).exists():
        state.recover_one(gen)


def _report(state, opts, status, outcome: Outcome, started, steps, log) -> None:
    now = time.time()
    attempt = {
        "gen": outcome.gen,
        "started_at": started,
        "finished_at": now,
        "finished": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "outcome": outcome.name,
        "exit_code": outcome.code,
        "message": outcome.message,
        "warnings": outcome.warnings,
        "steps": {k: round(v, 3) for k, v in steps.items()},
        "gate": outcome.gate.to_dict() if outcome.gate else None,
        "replicas": [r.to_dict() for r in outcome.replicas],
    }
    status["last_attempt"] = attempt
    if outcome.name == "published":
        status["last_success"] = attempt
    try:
        write_status(state.status_path, status)
        warning = export(status, opts.max_age_hours * 3600, state.root, opts.pushgateway)
    except OSError as exc:  # a state folder that is not writable: the message says it already
        warning = f"could not write {state.status_path}: {exc}"
    if warning:
        log(f"warning: {warning}")
