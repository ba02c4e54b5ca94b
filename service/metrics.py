"""Prometheus metrics of one app instance (a fresh CollectorRegistry each, so tests never collide).

Multi-worker: ``csmf serve --workers N`` (N > 1) sets ``PROMETHEUS_MULTIPROC_DIR`` before uvicorn
spawns its workers, so counters and histograms are summed over workers by a MultiProcessCollector
at scrape time. State that every worker holds identically (bundle, index size, scenario weights)
is not stored in gauges at all: a collector reads it from the scraping worker at scrape time, so
a deleted scenario or a replaced bundle never leaves a stale series behind.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

# Request latency: resolves 0.5–50 ms (the SLO range) finely, plus a tail up to 10 s.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0065, 0.008, 0.01,
    0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
STAGE_BUCKETS = (
    0.00002, 0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002,
    0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.5,
)  # fmt: skip
ROUTES = (
    "/v1/retrieve",
    "/v1/retrieve/batch",
    "/v1/feedback",
    "/playground",
    "/admin/scenarios",
    "/admin/scenarios/{name}",
    "/admin/bundle",
    "/admin/reload",
    "/healthz",
    "/readyz",
    "/metrics",
    "other",
)
STAGES = ("features", "encode", "search", "explain")
STORES = ("weights", "features")
EXPLICIT = "_explicit"  # scenario label of requests with explicit weights
NO_ARM = "_none"  # arm label of scenarios without experiment arms (arm names start alphanumeric)
FEEDBACK_EVENTS = ("click", "conversion")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


SCENARIO_LABEL_MODES = ("name", "hash", "none")
NAMED = "_named"  # scenario label of every named scenario when names are not exposed ("none")


def scenario_label(name: str | None, mode: str) -> str:
    """The ``scenario`` label of a request or weight series. /metrics is unauthenticated, so
    scenario names (which can carry campaign names) can be replaced by a stable hash ("hash":
    ``h-`` + 10 hex digits of SHA-256, the same on every replica) or omitted ("none")."""
    if name is None:
        return EXPLICIT
    if mode == "hash":
        return "h-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    if mode == "none":
        return NAMED
    return name


# -- hot path ---------------------------------------------------------------------------------------
# A request records 7 values (4 histograms, 3 counters) through prometheus_client's public API on
# pre-bound label children. Writing its value objects directly saved 6.7 µs of a request's ~690 µs
# of CPU with several workers, 3 µs in one process (bench/results/metric-writes.md): not worth
# depending on the library's private internals.


class ServiceMetrics:
    def __init__(self, scenario_labels: str = "name") -> None:
        if scenario_labels not in SCENARIO_LABEL_MODES:
            raise ValueError(
                f"scenario_labels must be one of {SCENARIO_LABEL_MODES}, got {scenario_labels!r}"
            )
        self.scenario_labels = scenario_labels
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "csmf_http_request_duration_seconds",
            "HTTP request latency by route template and status code",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "csmf_retrieve_stage_seconds",
            "Time per retrieval stage (features lookup, user encode, FAISS search, explain)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.requests_total = Counter(
            "csmf_retrieve_requests_total",
            f"Retrieve calls by scenario ({EXPLICIT} = explicit weights) and endpoint",
            ["scenario", "endpoint"],
            registry=r,
        )
        self.users_total = Counter(
            "csmf_retrieve_users_total",
            "Users retrieved for, by endpoint and whether the cold-start vector was used",
            ["endpoint", "cold_start"],
            registry=r,
        )
        self.impressions_total = Counter(
            "csmf_impressions_total",
            f"Items served by /v1/retrieve, by scenario and experiment arm ({NO_ARM}: no arms)",
            ["scenario", "arm"],
            registry=r,
        )
        self.feedback_total = Counter(
            "csmf_feedback_events_total",
            "Feedback events (click, conversion) by scenario and experiment arm",
            ["scenario", "arm", "event"],
            registry=r,
        )
        self.event_log_rows_total = Counter(
            "csmf_event_log_rows_total", "Rows written to the event log", registry=r
        )
        self.event_log_dropped_total = Counter(
            "csmf_event_log_dropped_total",
            "Event log rows dropped (queue full or write failed)",
            registry=r,
        )
        self.reloads_total = Counter(
            "csmf_bundle_reloads_total", "Hot reloads by result", ["result"], registry=r
        )
        self.store_errors_total = Counter(
            "csmf_store_errors_total",
            "Failed sync or write calls to a shared store (Redis or the scenarios file)",
            ["store"],
            registry=r,
        )
        # 1 = in sync with the shared store, 0 = degraded (serving the last known state).
        # livemin: with several workers, one degraded worker makes the instance degraded.
        self.store_up = Gauge(
            "csmf_store_up",
            "1 when the store is in sync with its backend, 0 when degraded (last known state)",
            ["store"],
            multiprocess_mode="livemin",
            registry=r,
        )
        for route in ROUTES:  # pre-initialise the label sets dashboards expect
            self.request_seconds.labels(route, "200")
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for result in ("success", "failure"):
            self.reloads_total.labels(result)
        for store in STORES:
            self.store_errors_total.labels(store)
        self.requests_total.labels(scenario_label("default", scenario_labels), "single")
        default = scenario_label("default", scenario_labels)
        self.impressions_total.labels(default, NO_ARM)
        for event in FEEDBACK_EVENTS:
            self.feedback_total.labels(default, NO_ARM, event)
        self.stage = {s: self.stage_seconds.labels(s) for s in STAGES}
        self._route_status: dict[tuple[str, int], Histogram] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        child = self._route_status.get((route, status))
        if child is None:
            child = self._route_status[(route, status)] = self.request_seconds.labels(
                route, str(status)
            )
        child.observe(seconds)

    def add_state_collector(self, state: Callable[[], Iterable[Metric]]) -> None:
        self.state_collector = _StateCollector(state)
        self.registry.register(self.state_collector)

    def process_exit(self) -> None:
        """Drop this worker's live gauges (``livemin``) so an exited worker's last state does not
        linger in the instance's view. A worker that crashes keeps its files until the server
        restarts (``csmf serve`` uses a fresh folder per run)."""
        if multiprocess_dir() is not None:
            mark_process_dead(os.getpid())

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this registry, or all workers' files plus this worker's state."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        forget_dead_workers(multiprocess_dir())
        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        reg.register(self.state_collector)
        return generate_latest(reg), CONTENT_TYPE_LATEST


def forget_dead_workers(folder: str) -> None:
    """Drop the live gauges (``csmf_store_up``) of worker processes that no longer exist. A worker
    killed by a signal (OOM, SIGKILL) never runs :meth:`ServiceMetrics.process_exit`, and its last
    value would otherwise count in ``livemin`` forever: one worker that died degraded would keep
    the instance reported degraded after the store and the replacement worker recovered."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], Iterable[Metric]]) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        return self._state()


def state_metrics(
    *,
    model_version: str,
    index_type: str,
    objectives: Iterable[str],
    items: int,
    loaded_at: float,
    scenarios: Iterable[tuple[str, dict[str, float]]],
    stores: Iterable[tuple[str, str, float]],
    corrupt_files: int = 0,
    scenario_labels: str = "name",
) -> list[Metric]:
    """Scrape-time gauges from the serving state (see the module docstring)."""
    info = GaugeMetricFamily(
        "csmf_bundle_info",
        "The bundle being served (value 1)",
        labels=["model_version", "index_type", "objectives"],
    )
    info.add_metric([model_version, index_type, ",".join(objectives)], 1)
    size = GaugeMetricFamily("csmf_index_vectors", "Item vectors in the served FAISS index")
    size.add_metric([], items)
    loaded = GaugeMetricFamily(
        "csmf_bundle_loaded_timestamp_seconds", "Unix time the bundle was loaded"
    )
    loaded.add_metric([], loaded_at)
    weights = GaugeMetricFamily(
        "csmf_scenario_weight",
        "Objective weight k_t of each scenario",
        labels=["scenario", "objective"],
    )
    if scenario_labels != "none":  # "none": which weights a campaign uses is not exposed either
        for name, w in scenarios:
            for obj, v in w.items():
                weights.add_metric([scenario_label(name, scenario_labels), obj], v)
    age = GaugeMetricFamily(
        "csmf_store_sync_age_seconds",
        "Seconds since the store last synced with its backend",
        labels=["store", "backend"],
    )
    now = time.time()
    for store, backend, last in stores:
        age.add_metric([store, backend], max(0.0, now - last) if last else float("inf"))
    corrupt = GaugeMetricFamily(
        "csmf_scenarios_file_corrupt",
        "1 while the embedded store's scenarios file is unreadable (serving from memory; the "
        "next admin write rewrites it and keeps the bad file as *.corrupt-<time>)",
    )
    corrupt.add_metric([], corrupt_files)
    return [info, size, loaded, weights, age, corrupt]
