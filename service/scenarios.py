"""The scenarios a request may name, and the weights it is served with
(docs/design.md#the-weight-store-and-its-consistency).

:class:`Scenarios` owns the weight store of the settings (the embedded file, or Redis shared by
replicas) and turns a request's ``scenario`` or explicit ``weights`` into weights in cascade order
and the (D,) query scale, serving a scenario with experiment arms the arm its user is assigned
(``service/experiments.py``). Scales are cached per bundle (a reload starts afresh) and per
scenario version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from csmf.errors import WeightsError
from service.errors import FieldError
from service.experiments import assign
from service.metrics import ServiceMetrics
from service.retriever import Retriever
from service.settings import Settings
from service.weight_store import (
    DEFAULT_SCENARIO,
    FileWeightStore,
    RedisWeightStore,
    Scenario,
    WeightStore,
)

SCALE_CACHE = 1024  # distinct (scenario, version, arm) scales kept per bundle


class Scenarios:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store: WeightStore | None = None

    def open(self, objectives: Sequence[str]) -> None:
        """The weight store for the served cascade's objectives (not started yet)."""
        s, m = self.settings, self.metrics
        hooks = {
            "on_state": lambda up: m.store_up.labels("weights").set(int(up)),
            "on_error": lambda: m.store_errors_total.labels("weights").inc(),
        }
        if s.redis_url:
            self.store = RedisWeightStore(
                s.redis_url, s.redis_prefix, objectives, s.sync_interval_s, s.redis_timeout_s,
                **hooks,
            )  # fmt: skip
        else:
            self.store = FileWeightStore(s.scenarios_file, objectives, s.sync_interval_s, **hooks)
        m.store_up.labels("weights").set(0)

    def stop(self) -> None:
        if self.store is not None:
            self.store.stop()

    def get(self, name: str | None) -> Scenario:
        """The scenario ``name`` (default: the default one) as the weight store holds it now."""
        return self.store.get(DEFAULT_SCENARIO if name is None else name)

    def resolve(
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
            sc = self.store.get(name)
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
            if len(cache) > SCALE_CACHE:
                cache.clear()
            hit = cache[key] = (w, retriever.scale(w))
        return hit[0], hit[1], name, arm and arm.name
