"""What one app instance serves: the current Retriever (swapped atomically on reload), the weight
and feature stores, metrics, and the announcement of reloads to the other workers of the server.

Hot reload: load and verify the new bundle fully (checksums, dimensions, a smoke search) off the
request path, then replace one reference. Requests already running finish on the old Retriever;
a bundle that fails any check never becomes visible. With several workers (``csmf serve
--workers N``) the worker that reloaded writes ``control_dir/bundle.json``; the others poll it and
load the same bundle, so the whole server converges within a poll interval plus a load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from csmf.atomic import atomic_write_text
from csmf.bundle import Bundle, load_bundle
from csmf.errors import BundleError, WeightsError
from service.errors import ConflictError, FieldError, ReloadError
from service.event_log import EventLog
from service.experiments import assign
from service.feature_store import BundleFeatureStore, RedisFeatureStore
from service.feedback_key import signing_key
from service.feedback_once import FeedbackOnce
from service.metrics import (
    NO_ARM,
    HotCounter,
    ServiceMetrics,
    scenario_label,
    state_metrics,
)
from service.request_ids import RequestIds
from service.retriever import Retriever
from service.settings import Settings
from service.sync import BackgroundSync
from service.weight_store import (
    DEFAULT_SCENARIO,
    FileWeightStore,
    RedisWeightStore,
    Scenario,
    WeightStore,
)

log = logging.getLogger("csmf.service")
CONTROL_FILE = "bundle.json"


class AppState:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.retriever: Retriever | None = None
        self.weights: WeightStore | None = None
        self.features: BundleFeatureStore | RedisFeatureStore | None = None
        self._reload_lock = threading.Lock()
        self._control: BackgroundSync | None = None
        self._control_sig: tuple | None = None
        self._counters: dict[tuple, Any] = {}
        self._served: dict[tuple, Any] = {}
        self.request_ids: RequestIds | None = None  # its key may live in Redis: set in start()
        self.feedback_once = FeedbackOnce(
            settings.redis_url, settings.redis_prefix, settings.redis_timeout_s
        )
        self.event_log: EventLog | None = None
        stage = metrics.stage
        self._observe = lambda name, seconds: stage[name].observe(seconds)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        s, m = self.settings, self.metrics
        self.request_ids = RequestIds(signing_key(s), s.feedback_ttl_s)
        path = self._announced_path() or s.bundle
        if s.feature_store == "redis":
            self.features = RedisFeatureStore(
                s.redis_url, s.redis_prefix, s.sync_interval_s, s.redis_timeout_s,
                on_state=lambda up: m.store_up.labels("features").set(int(up)),
                on_error=lambda: m.store_errors_total.labels("features").inc(),
            )  # fmt: skip
        else:
            self.features = BundleFeatureStore()
            m.store_up.labels("features").set(1)
        self.retriever = self._build(self._load(path, s.verify_bundle))
        objectives = self.retriever.objectives
        hooks = {
            "on_state": lambda up: m.store_up.labels("weights").set(int(up)),
            "on_error": lambda: m.store_errors_total.labels("weights").inc(),
        }
        if s.redis_url:
            self.weights = RedisWeightStore(
                s.redis_url,
                s.redis_prefix,
                objectives,
                s.sync_interval_s,
                s.redis_timeout_s,
                **hooks,
            )
        else:
            self.weights = FileWeightStore(s.scenarios_file, objectives, s.sync_interval_s, **hooks)
        m.store_up.labels("weights").set(0)
        self.weights.start()
        self.features.start()
        # A healthy store serves the shared scenarios from the first request; a dead one must not
        # keep the service from starting (it serves the built-in default meanwhile).
        end = time.monotonic() + 2.0
        while time.monotonic() < end and not (self.weights.health.up and self.features.health.up):
            time.sleep(0.01)
        if s.control_dir is not None:
            self._control = BackgroundSync(
                "bundle", self._follow_announcement, s.sync_interval_s, lambda up: None,
                lambda: m.reloads_total.labels("failure").inc(),
            )  # fmt: skip
            self._control.start()
        if s.event_log_dir is not None:
            self.event_log = EventLog(
                s.event_log_dir, s.event_log_queue, s.event_log_rotate_rows, s.event_log_rotate_s,
                on_drop=m.event_log_dropped_total.inc, on_write=m.event_log_rows_total.inc,
                sync_s=s.event_log_sync_s,
            )  # fmt: skip
            self.event_log.start()
        m.add_state_collector(self._state_metrics)

    def stop(self) -> None:
        for part in (self._control, self.weights, self.features, self.event_log):
            if part is not None:
                part.stop()
        self.feedback_once.close()

    # -- requests ---------------------------------------------------------------------------------

    def check_k(self, k: int | None) -> int:
        if k is None:
            return self.settings.default_k
        if not 1 <= k <= self.settings.max_k:
            raise FieldError(("k",), f"k must be in [1, {self.settings.max_k}], got {k}")
        return k

    def scenario(self, name: str | None) -> Scenario:
        """The scenario ``name`` (default: the default one) as the weight store holds it now."""
        return self.weights.get(DEFAULT_SCENARIO if name is None else name)

    def resolve_weights(
        self,
        retriever: Retriever,
        scenario: str | None,
        weights: Any,
        user_id: str | None = None,
        sc: Scenario | None = None,
    ) -> tuple[tuple[float, ...], np.ndarray, str | None, str | None]:
        """(weights in cascade order, (D,) query scale, scenario name or None if explicit,
        experiment arm or None). A scenario with arms serves ``user_id`` its assigned arm's.
        ``sc``: the scenario already read (a batch reads it once, so a concurrent admin write
        cannot change it between users), else it is read now."""
        if weights is not None:
            if scenario is not None:
                raise FieldError(("scenario",), "give either `scenario` or `weights`, not both")
            w, scale = retriever.explicit(weights)
            return w, scale, None, None
        name = DEFAULT_SCENARIO if scenario is None else scenario
        if sc is None:
            sc = self.weights.get(name)
        arm = assign(name, user_id, sc.arms) if sc.arms else None
        key = (name, sc.version, sc.updated_at, arm and arm.name)
        cache = retriever.scenario_cache  # per bundle: a reload starts afresh
        hit = cache.get(key)
        if hit is None:
            try:
                w = retriever.weights(arm.weights if arm else sc.weights)
            except WeightsError as exc:
                raise FieldError(
                    ("scenario",), f"scenario {name!r} does not fit the served cascade: {exc}"
                ) from None
            if len(cache) > 1024:
                cache.clear()
            hit = cache[key] = (w, retriever.scale(w))
        return hit[0], hit[1], name, arm and arm.name

    def served(
        self,
        scenario: str | None,
        arm: str | None,
        user_id: str | None,
        retriever: Retriever,
        rows: list[int],
        count: bool = True,
        cold: bool = False,
    ) -> str:
        """Count the impressions (unless ``count`` is False: a batch counts each arm's once, with
        :meth:`count_impressions`), log them, and return the request id for feedback."""
        if count:
            self.count_impressions(scenario, arm, len(rows))
        token, rid = self.request_ids.issue(
            user_id, scenario, arm, retriever.item_fps[rows].tobytes()
        )
        if self.event_log is not None and rows:  # cold start and history-only rows are marked
            self.event_log.served(rid, user_id, retriever.item_ids[rows].tolist(), cold)
        return token

    def count_impressions(self, scenario: str | None, arm: str | None, n: int) -> None:
        c = self._served.get((scenario, arm))
        if c is None:
            mode = self.metrics.scenario_labels
            a = NO_ARM if arm is None else scenario_label(arm, mode)
            c = self._served[(scenario, arm)] = HotCounter(
                self.metrics.impressions_total.labels(scenario_label(scenario, mode), a)
            )
        c.inc(n)

    def count(self, scenario: str | None, endpoint: str, cold: int, warm: int) -> None:
        c = self._counters.get((scenario, endpoint))
        if c is None:
            m = self.metrics
            label = scenario_label(scenario, m.scenario_labels)  # once per (scenario, endpoint)
            c = self._counters[(scenario, endpoint)] = (
                HotCounter(m.requests_total.labels(label, endpoint)),
                HotCounter(m.users_total.labels(endpoint, "true")),
                HotCounter(m.users_total.labels(endpoint, "false")),
            )
        c[0].inc()
        if cold:
            c[1].inc(cold)
        if warm:
            c[2].inc(warm)

    # -- reload -----------------------------------------------------------------------------------

    def _load(self, path: str | Path, verify: bool) -> Bundle:
        return load_bundle(path, verify=verify, index_uri=self.settings.index_uri)

    def _build(self, bundle: Bundle) -> Retriever:
        """A Retriever for ``bundle`` after a smoke search: finite scores, valid rows."""
        r = Retriever(bundle, self.features.lookup, self._observe)
        k = min(5, r.n_items)
        hits = r.retrieve(None, None, r.scale(tuple(1.0 for _ in r.objectives)), k)
        if len(hits.rows) != k or not all(math.isfinite(s) for s in hits.scores):
            raise BundleError(
                f"bundle {bundle.path} failed the smoke search: {hits.rows} {hits.scores}"
            )
        return r

    def reload(self, path: str | None) -> tuple[Retriever, Retriever]:
        """Load, verify and swap in the bundle at ``path`` (default: the configured one).
        Returns (old, new). Raises ReloadError and keeps the old one serving on any failure."""
        if not self._reload_lock.acquire(blocking=False):
            raise ConflictError("a reload is already running; try again when it has finished")
        old = self.retriever
        try:
            target = Path(path) if path else self.settings.bundle
            try:
                new = self._build(self._load(target, True))
            except Exception as exc:
                self.metrics.reloads_total.labels("failure").inc()
                log.error(
                    "reload of %s failed, still serving %s: %s", target, old.model_version, exc
                )
                msg = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
                raise ReloadError(
                    f"reload failed, still serving {old.model_version}: {msg}", old.model_version
                ) from None
            self.retriever = new  # the swap: one reference assignment
            self.metrics.reloads_total.labels("success").inc()
            log.info("reloaded %s (%s → %s)", target, old.model_version, new.model_version)
            self._announce(new)
            return old, new
        finally:
            self._reload_lock.release()

    def _control_path(self) -> Path | None:
        d = self.settings.control_dir
        return None if d is None else Path(d) / CONTROL_FILE

    def _announced_path(self) -> Path | None:
        p = self._control_path()
        if p is None or not p.exists():
            return None
        return Path(json.loads(p.read_text())["path"])

    def _announce(self, r: Retriever) -> None:
        p = self._control_path()
        if p is None:
            return
        atomic_write_text(
            p, json.dumps({"path": str(r.bundle.path), "model_version": r.model_version})
        )
        self._control_sig = _sig(p)

    def _follow_announcement(self) -> None:
        p = self._control_path()
        sig = _sig(p)
        if sig is not None and sig != self._control_sig:
            doc = json.loads(p.read_text())
            cur = self.retriever
            if (doc["path"], doc["model_version"]) != (str(cur.bundle.path), cur.model_version):
                with self._reload_lock:
                    new = self._build(self._load(doc["path"], self.settings.verify_bundle))
                    self.retriever = new
                self.metrics.reloads_total.labels("success").inc()
                log.info("followed reload announced by another worker: %s", new.model_version)
            self._control_sig = sig
        self._control.mark_ok()
        self._control.wait(self.settings.sync_interval_s)

    # -- health and metrics -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict]:
        r = self.retriever
        if r is None:
            return False, {"status": "starting"}
        ws = {"backend": self.weights.backend, **self.weights.health.as_dict()}
        if self.weights.corrupt:
            ws["corrupt"] = self.weights.corrupt
        fs = {"backend": self.features.backend, **self.features.health.as_dict()}
        degraded = ws["state"] != "ok" or fs["state"] != "ok"
        return True, {
            "status": "degraded" if degraded else "ok",
            "model_version": r.model_version,
            "weight_store": ws,
            "feature_store": fs,
        }

    def _state_metrics(self):
        r = self.retriever
        if r is None:
            return []
        w = self.weights
        return state_metrics(
            model_version=r.model_version,
            index_type=r.bundle.index_type,
            objectives=r.objectives,
            items=r.n_items,
            loaded_at=r.loaded_at,
            scenarios=[(n, s.weights) for n, s in w.scenarios.items()],
            corrupt_files=int(w.corrupt is not None),
            scenario_labels=self.metrics.scenario_labels,
            stores=[("weights", w.backend, w.health.last_sync)]
            + (
                [("features", self.features.backend, self.features.health.last_sync)]
                if self.features.backend == "redis"
                else []
            ),
        )


def _sig(p: Path | None) -> tuple | None:
    try:
        st = os.stat(p)
    except (FileNotFoundError, TypeError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
