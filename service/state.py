"""What one app instance serves, as the parts it is made of, each owned by one module:

* ``bundle`` (:class:`~service.served_bundle.ServedBundle`): the bundle and its index — the
  current Retriever, swapped atomically on reload — and the feature store the user tower reads;
* ``scenarios`` (:class:`~service.scenarios.Scenarios`): the weight store, and a request's
  scenario or weights → query scale, experiment arms included;
* ``outcomes`` (:class:`~service.outcomes.Outcomes`): request ids, impressions and feedback,
  counted per scenario and arm;
* ``event_log`` (:class:`~service.event_log.EventLog`, or None): the served/feedback log;
* ``settings`` (:class:`~service.settings.Settings`) and ``metrics``.

:class:`AppState` only starts and stops them in order and answers for them together
(readiness, the state gauges of /metrics).
"""

from __future__ import annotations

import time

from service.event_log import EventLog, open_event_log
from service.metrics import ServiceMetrics, state_metrics
from service.outcomes import Outcomes
from service.scenarios import Scenarios
from service.served_bundle import ServedBundle
from service.settings import Settings

STARTUP_SYNC_S = 2.0  # how long startup waits for healthy stores before serving the defaults


class AppState:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bundle = ServedBundle(settings, metrics)
        self.scenarios = Scenarios(settings, metrics)
        self.outcomes = Outcomes(settings, metrics)
        self.event_log: EventLog | None = None

    def start(self) -> None:
        self.bundle.open()  # the feature store and the bundle, verified
        self.scenarios.open(self.bundle.retriever.objectives)
        weights, features = self.scenarios.store, self.bundle.features
        weights.start()
        features.start()
        # A healthy store serves the shared scenarios from the first request; a dead one must not
        # keep the service from starting (it serves the built-in default meanwhile).
        end = time.monotonic() + STARTUP_SYNC_S
        while time.monotonic() < end and not (weights.health.up and features.health.up):
            time.sleep(0.01)
        self.bundle.follow_announcements()
        self.bundle.follow_items()
        self.event_log = open_event_log(self.settings, self.metrics)
        self.outcomes.start(self.event_log)
        self.metrics.add_state_collector(self._state_metrics)

    def stop(self) -> None:
        self.bundle.stop()
        self.scenarios.stop()
        if self.event_log is not None:
            self.event_log.stop()
        self.outcomes.stop()

    # -- health and metrics -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict]:
        r = self.bundle.retriever
        if r is None:
            return False, {"status": "starting"}
        weights, features = self.scenarios.store, self.bundle.features
        ws = {"backend": weights.backend, **weights.health.as_dict()}
        if weights.corrupt:
            ws["corrupt"] = weights.corrupt
        fs = {"backend": features.backend, **features.health.as_dict()}
        index = r.bundle.index
        error = index.health()  # an engine over the network (Milvus) may be away
        ix = {"backend": index.capabilities.backend, "state": "ok" if error is None else "down"}
        if error is not None:
            ix["error"] = error
        items = self.bundle.items  # following the item log (and, with Redis, its position)
        il = {"applied_seq": r.catalogue.seq if r.catalogue is not None else 0}
        if items is not None:
            il.update(items.sync.health.as_dict())
        degraded = ws["state"] != "ok" or fs["state"] != "ok" or error is not None
        degraded = degraded or il.get("state", "ok") != "ok"
        return True, {
            "status": "degraded" if degraded else "ok",
            "model_version": r.model_version,
            "weight_store": ws,
            "feature_store": fs,
            "index": ix,
            "item_log": il,
        }

    def _state_metrics(self):
        r = self.bundle.retriever
        if r is None:
            return []
        w, f = self.scenarios.store, self.bundle.features
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
            + ([("features", f.backend, f.health.last_sync)] if f.backend == "redis" else []),
        )
