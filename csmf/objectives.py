"""The objective registry: the conversion funnel every stage reads instead of naming it.

One :class:`Objective` per cascade stage kind, in funnel order: its name (used in configs,
checkpoints, bundles, weights and metrics), the events column whose true rows are its positives
(``None``: every event is a positive — the exposure log itself) and its parent, the objective
whose positives contain its own (a conversion is a click: ``converted ⇒ clicked``; the loader
refuses data that breaks it). Training, data validation, evaluation and the benchmarks ask this
module; a cascade is any ordered subset of these names (``cascade.objectives``).

A trained cascade can grow by objectives of its own (``csmf extend``; trainer/extend.py): each is
*defined* — a name and the events column marking its positives — by the run's config
(``cascade.labels``), comes after the funnel's objectives, and is known to this process from the
moment that config is read (:func:`define`).
"""

from __future__ import annotations

import re
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
_DEFINED: dict[str, Objective] = {}  # objectives added to trained cascades (define)
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_RESERVED_COLUMNS = {"user_id", "item_id", "timestamp", "request_id", "cold_start"}


def define(name: str, column: str, parent: str | None = None) -> Objective:
    """Make objective ``name`` (positives: events where the bool ``column`` is true) known to
    this process; defining it again alike is a no-op, differently an error."""
    if name in _BY_NAME:
        raise ConfigError(f"objective {name!r} is one of the funnel's {list(NAMES)}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"objective name {name!r} must be 1-32 lowercase letters, digits or '_', starting "
            "with a letter"
        )
    taken = set(LABEL_COLUMNS) | _RESERVED_COLUMNS
    taken |= {o.column for o in _DEFINED.values() if o.name != name}
    if not isinstance(column, str) or not column or column in taken:
        raise ConfigError(
            f"objective {name!r}: label column {column!r} is empty or already used "
            f"({sorted(c for c in taken if c)})"
        )
    if parent is not None:
        get(parent)
    o = Objective(name, column, parent, name + "_positives")
    old = _DEFINED.get(name)
    if old is not None and old != o:
        raise ConfigError(f"objective {name!r} is already defined as {old}, not {o}")
    _DEFINED[name] = o
    return o


def get(name: str) -> Objective:
    o = _BY_NAME.get(name) or _DEFINED.get(name)
    if o is None:
        known = [*NAMES, *_DEFINED]
        raise ConfigError(
            f"unknown objective {name!r}; expected one of {known} (an objective added to a "
            "trained cascade is defined by its config's cascade.labels)"
        )
    return o


def defined() -> tuple[Objective, ...]:
    """The objectives added by :func:`define`, in definition order."""
    return tuple(_DEFINED.values())


def label_columns(names: Sequence[str]) -> tuple[str, ...]:
    """The events columns the cascade ``names`` reads its positives from."""
    return tuple(c for c in (get(n).column for n in names) if c is not None)


def check_cascade(names: Sequence[str], key: str = "cascade.objectives") -> tuple[str, ...]:
    """``names`` as a valid cascade: known, distinct, the funnel's in funnel order (each stage
    narrower), then any defined ones."""
    names = tuple(names)
    known = {*NAMES, *_DEFINED}
    bad = [n for n in names if n not in known]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(
            f"{key} must be distinct names from {[*NAMES, *_DEFINED]}, got {list(names)}"
        )
    order = [NAMES.index(n) if n in _BY_NAME else len(NAMES) for n in names]
    if order != sorted(order):
        raise ConfigError(
            f"{key} must follow the funnel order {list(NAMES)}, objectives added later last; "
            f"got {list(names)}"
        )
    return names
