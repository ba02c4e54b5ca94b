"""What was served and what came back (docs/design.md#tune-experiment-feedback): the request ids
that feedback cites, the request, user and impression counters per scenario and experiment arm,
feedback recorded exactly once and counted per arm, and both appended to the event log when one
is configured (``service/event_log.py`` owns the log; this module only hands it rows).
"""

from __future__ import annotations

from typing import Any

from service.event_log import EventLog
from service.feedback_key import signing_key
from service.feedback_once import FeedbackOnce
from service.metrics import NO_ARM, ServiceMetrics, scenario_label
from service.request_ids import RequestIds, Served
from service.retriever import Retriever
from service.settings import Settings


class Outcomes:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.request_ids: RequestIds | None = None  # its key may live in Redis: set in start()
        self.feedback_once = FeedbackOnce(
            settings.redis_url, settings.redis_prefix, settings.redis_timeout_s
        )
        self.event_log: EventLog | None = None
        self._counters: dict[tuple, Any] = {}
        self._served: dict[tuple, Any] = {}

    def start(self, event_log: EventLog | None) -> None:
        self.request_ids = RequestIds(signing_key(self.settings), self.settings.feedback_ttl_s)
        self.event_log = event_log

    def stop(self) -> None:
        self.feedback_once.close()

    # -- served -----------------------------------------------------------------------------------

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
            label = scenario_label(scenario, mode)
            c = self._served[(scenario, arm)] = self.metrics.impressions_total.labels(label, a)
        c.inc(n)

    def count(self, scenario: str | None, endpoint: str, cold: int, warm: int) -> None:
        c = self._counters.get((scenario, endpoint))
        if c is None:
            m = self.metrics
            label = scenario_label(scenario, m.scenario_labels)  # once per (scenario, endpoint)
            c = self._counters[(scenario, endpoint)] = (
                m.requests_total.labels(label, endpoint),
                m.users_total.labels(endpoint, "true"),
                m.users_total.labels(endpoint, "false"),
            )
        c[0].inc()
        if cold:
            c[1].inc(cold)
        if warm:
            c[2].inc(warm)

    # -- feedback ---------------------------------------------------------------------------------

    def feedback(
        self, served: Served, user_id: str | None, item_id: str, event: str, lifetime: float
    ) -> bool:
        """Record a verified feedback event once: count it per scenario and arm and log it.
        False (nothing recorded) if this (request id, item, event) was recorded before within
        ``lifetime`` seconds (the request id's remaining validity)."""
        if not self.feedback_once.first(served.id, item_id, event, lifetime):
            return False
        mode = self.metrics.scenario_labels
        arm = NO_ARM if served.arm is None else scenario_label(served.arm, mode)
        self.metrics.feedback_total.labels(scenario_label(served.scenario, mode), arm, event).inc()
        if self.event_log is not None:
            self.event_log.feedback(served.id, user_id, item_id, event, cold=user_id is None)
        return True
