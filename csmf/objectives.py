"""The objective registry: the conversion funnel every stage reads instead of naming it.

One :class:`Objective` per cascade stage kind, in funnel order: its name (used in configs,
checkpoints, bundles, weights and metrics), the events column whose true rows are its positives
(``None``: every event is a positive — the exposure log itself) and its parent, the objective
whose positives contain its own (a conversion is a click: ``converted ⇒ clicked``; the loader
refuses data that breaks it). Training, data validation, evaluation and the benchmarks ask this
module; a cascade is any ordered subset of these names (``cascade.objectives``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from csmf.errors import ConfigError


@dataclass(frozen=True)
class Objective:
    name: str
    column: str | None  # events column marking positives; None = every event
    parent: str | None  # the objective whose positives contain this one's
    plural: str  # dataset counts key ("clicks")

    def positive(self, labels: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """(n,) bool: which of ``n`` events are positives, from their label columns."""
        if self.column is None:
            return np.ones(n, bool)
        return np.asarray(labels[self.column], bool)


FUNNEL: tuple[Objective, ...] = (
    Objective("exposure", None, None, "exposures"),
    Objective("click", "clicked", "exposure", "clicks"),
    Objective("conversion", "converted", "click", "conversions"),
)
NAMES: tuple[str, ...] = tuple(o.name for o in FUNNEL)
LABEL_COLUMNS: tuple[str, ...] = tuple(o.column for o in FUNNEL if o.column is not None)
# What quality is measured on: every objective with a label of its own (exposure is the log).
TARGETS: tuple[str, ...] = tuple(o.name for o in FUNNEL if o.column is not None)
_BY_NAME = {o.name: o for o in FUNNEL}


def get(name: str) -> Objective:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r}; expected one of {list(NAMES)}") from None


def check_cascade(names: Sequence[str], key: str = "cascade.objectives") -> tuple[str, ...]:
    """``names`` as a valid cascade: known, distinct, in funnel order (each stage narrower)."""
    names = tuple(names)
    bad = [n for n in names if n not in _BY_NAME]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"{key} must be distinct names from {list(NAMES)}, got {list(names)}")
    order = [NAMES.index(n) for n in names]
    if order != sorted(order):
        raise ConfigError(f"{key} must follow the funnel order {list(NAMES)}, got {list(names)}")
    return names
