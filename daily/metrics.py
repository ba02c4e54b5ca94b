"""What ``csmf daily`` reports: ``STATE/status.json`` (the last attempt and the last success) and
the same facts as Prometheus gauges, pushed to a Pushgateway and written as a textfile
(``STATE/daily.prom``, for node_exporter's textfile collector).

Why a Pushgateway: a CronJob's pod lives for the minutes of the update, so Prometheus cannot
scrape it reliably — and the fact that matters most, the time of the last success, must outlive
the job. This is the case the Pushgateway exists for (the outcome of a service-level batch job):
the job PUTs its whole group at the end of every attempt (success or not), the gateway keeps it
(``--persistence.file``), and Prometheus scrapes the gateway. The model-age alert then compares
``time()`` with a timestamp, so it fires even if the job never runs again.

Every attempt pushes every series: the last success's timestamp and quality are carried over
from ``status.json``, so a failed attempt never erases them (a PUT replaces the group).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

from csmf.atomic import write_json

JOB = "csmf-daily"  # the Pushgateway group (job label) of every series
OUTCOMES = ("published", "unchanged", "refused", "reload_failed", "failed")
TEXTFILE = "daily.prom"


def read_status(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"last_attempt": None, "last_success": None}
    try:
        return json.loads(path.read_text())
    except ValueError:  # a hand-edited or foreign file: start a new history, do not crash
        return {"last_attempt": None, "last_success": None}


def write_status(path: Path, status: dict[str, Any]) -> None:
    write_json(path, status)


def registry_for(status: dict[str, Any], max_age_s: float) -> CollectorRegistry:
    """The gauges of ``status`` in a fresh registry (one per push)."""
    reg = CollectorRegistry()
    attempt, success = status.get("last_attempt"), status.get("last_success")
    if success:  # absent until the first success (a gauge would say 0, i.e. 1970)
        Gauge(
            "csmf_daily_last_success_timestamp_seconds",
            "Unix time the last csmf daily update finished successfully (published and reloaded)",
            registry=reg,
        ).set(success["finished_at"])
    Gauge(
        "csmf_daily_max_model_age_seconds",
        "Configured max age of the serving model (csmf daily --max-age-hours); the model-age "
        "alert compares against it",
        registry=reg,
    ).set(max_age_s)
    if attempt:
        Gauge(
            "csmf_daily_last_run_timestamp_seconds",
            "Unix time the last csmf daily attempt ended, whatever its outcome",
            registry=reg,
        ).set(attempt["finished_at"])
        outcome = Gauge(
            "csmf_daily_last_run_outcome",
            "1 for the outcome of the last attempt, 0 for the others",
            ["outcome"],
            registry=reg,
        )
        for o in OUTCOMES:
            outcome.labels(o).set(1.0 if attempt["outcome"] == o else 0.0)
        steps = Gauge(
            "csmf_daily_step_seconds", "Seconds of each step of the last attempt", ["step"],
            registry=reg,
        )  # fmt: skip
        for step, s in attempt.get("steps", {}).items():
            steps.labels(step).set(s)
        replicas = Gauge(
            "csmf_daily_replicas",
            "Replicas the last attempt asked to reload, by result",
            ["result"],
            registry=reg,
        )
        results = [r["ok"] for r in attempt.get("replicas", [])]
        replicas.labels("reloaded").set(sum(results))
        replicas.labels("failed").set(len(results) - sum(results))
        _quality(reg, "csmf_daily_quality", attempt.get("gate"), "of the last attempt's gate")
    if success:
        _quality(
            reg, "csmf_daily_published_quality", success.get("gate"),
            "of the model the last success published (its gate score)", with_model=False,
        )  # fmt: skip
    return reg


def _quality(reg, name: str, gate: dict | None, what: str, with_model: bool = True) -> None:
    if not gate:
        return
    labels = ["model", "target", "metric"] if with_model else ["target", "metric"]
    g = Gauge(name, f"Fused-score quality on the holdout {what}", labels, registry=reg)
    models = {"candidate": gate["candidate"]}
    if with_model and gate.get("serving"):
        models["serving"] = gate["serving"]
    for model, scores in models.items():
        if not with_model and model != "candidate":
            continue
        for target, metrics in scores.items():
            for metric, value in metrics.items():
                g.labels(*([model] if with_model else []), target, metric).set(value)


def export(
    status: dict[str, Any], max_age_s: float, state_root: Path, pushgateway: str | None
) -> str | None:
    """Write ``STATE/daily.prom`` and push to ``pushgateway`` (if given). Returns a warning
    instead of raising when the push fails: the update itself is done either way."""
    reg = registry_for(status, max_age_s)
    write_to_textfile(str(state_root / TEXTFILE), reg)  # atomic (temp file + rename)
    if not pushgateway:
        return None
    try:
        push_to_gateway(pushgateway, job=JOB, registry=reg, timeout=10)
    except OSError as exc:  # URLError is an OSError
        return f"could not push metrics to {pushgateway}: {exc}"
    return None
