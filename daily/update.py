"""One ``csmf daily`` update: read new events → train (warm start from the serving run; from
scratch on the first day) → gate against the serving model on the latest period → build and
verify the bundle → commit → ask every replica to reload → report.

Everything runs in this one process, calling the trainer, the gate and the index builder as
functions: the update holds its state lock for its whole life (a killed process releases it),
bad input surfaces as a typed error before any training (exit 2, one line), the gate scores
models already in memory, and no step pays a second torch start-up. The steps' own commands
(``csmf train``, ``csmf eval``, ``csmf build-index``) stay what an operator runs by hand.
"""

from __future__ import annotations

import copy
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
from daily.replicas import ReplicaResult, check_urls, reload_all, resolve
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
    max_age_hours: float = 26.0
    pushgateway: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.keep < 2:
            raise ConfigError(
                f"keep must be >= 2 (the serving model and the previous), got {self.keep}"
            )
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


class BadInput(CsmfError, ValueError):
    """Raised to the CLI for problems found before any training (exit 2)."""


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
    the serving run, the config, the data folder (columns, objectives, labels), the replicas."""
    from trainer.config import RunConfig, apply_override, load_config
    from trainer.data.dataset import load_dataset

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
            raw = copy.deepcopy(serving.train_config)
            for item in opts.overrides:
                apply_override(raw, item)
            cfg = RunConfig.from_dict(raw)
        else:
            raise ConfigError(
                f"{state.root} has no serving model yet: the first update trains from scratch "
                "and needs --config"
            )
        if serving is not None and cfg.features != serving.features:
            raise ConfigError(
                "the config's [features] differ from the serving model's; a new feature spec "
                "needs a new state folder (or drop --config to keep the serving model's)"
            )
        load_dataset(opts.data, cfg.features, objectives=cfg.objectives)
        resolve(opts.replicas, opts.replicas_dns)  # a DNS name that does not resolve fails here
    except CsmfError as exc:
        raise BadInput(str(exc)) from None
    return serving_gen, serving, cfg


def _update(state, opts, log, serving_gen, serving, cfg, steps, outcome) -> Outcome:
    from trainer.pipeline import train_run

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
    how = "from scratch" if serving is None else f"from scratch (serving: {serving_gen})"
    log(f"train {how} on {data}")
    train_run(cfg, data, partial / "run", log=log, progress=opts.progress)
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
    urls = resolve(opts.replicas, opts.replicas_dns)
    root = opts.replica_state or str(state.root.resolve())
    replica_bundle = f"{root.rstrip('/')}/bundles/{gen}"
    outcome.replicas = reload_all(
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
            f"published {gen}, but {len(failed)} of {len(urls)} replicas did not reload it "
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
    outcome_name = {
        OK: "published", REFUSED: "refused", RELOAD_FAILED: "reload_failed",
    }.get(outcome.code, "failed")  # fmt: skip
    attempt = {
        "gen": outcome.gen,
        "started_at": started,
        "finished_at": now,
        "finished": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "outcome": outcome_name,
        "exit_code": outcome.code,
        "message": outcome.message,
        "warnings": outcome.warnings,
        "steps": {k: round(v, 3) for k, v in steps.items()},
        "gate": outcome.gate.to_dict() if outcome.gate else None,
        "replicas": [r.to_dict() for r in outcome.replicas],
    }
    status["last_attempt"] = attempt
    if outcome.code == OK:
        status["last_success"] = attempt
    try:
        write_status(state.status_path, status)
        warning = export(status, opts.max_age_hours * 3600, state.root, opts.pushgateway)
    except OSError as exc:  # a state folder that is not writable: the message says it already
        warning = f"could not write {state.status_path}: {exc}"
    if warning:
        log(f"warning: {warning}")
