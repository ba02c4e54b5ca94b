"""Experiment arms of a scenario: validation and sticky assignment
(docs/design.md#tune-experiment-feedback).

A scenario may hold arms instead of one triplet::

    {"arms": [{"name": "control", "weights": {...}, "share": 0.9},
              {"name": "more-conv", "weights": {...}, "share": 0.1}]}

A user is assigned by a stable hash of (scenario name, user id): SHA-256 → a number in [0, 1) →
the arm whose cumulative share covers it. Nothing is stored per user, so the assignment is the
same on every replica and after every restart, and changing one arm's weights moves nobody;
changing the shares moves only the users whose number falls between the old and new boundaries.
A request without a user id (history only) has no identity to stick to: it is assigned by a
random number per request.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from csmf.names import NAME_RULE, is_name

SHARE_TOLERANCE = 1e-9
MAX_ARMS = 16


@dataclass(frozen=True)
class Arm:
    name: str
    weights: dict[str, float]
    share: float

    def doc(self) -> dict:
        return {"name": self.name, "weights": self.weights, "share": self.share}


class ArmsError(ValueError):
    """Arms that cannot form an experiment; the message names the problem and the value."""


def check_arms(arms: Sequence[Arm]) -> tuple[Arm, ...]:
    """Names valid and unique, 1..MAX_ARMS arms, shares in (0, 1] summing to 1 within 1e-9.
    Weights are validated by the caller, which knows the served cascade."""
    if not 1 <= len(arms) <= MAX_ARMS:
        raise ArmsError(f"an experiment needs 1..{MAX_ARMS} arms, got {len(arms)}")
    seen = set()
    for a in arms:
        if not is_name(a.name):
            raise ArmsError(f"arm name {a.name!r} must be {NAME_RULE}")
        if a.name in seen:
            raise ArmsError(f"arm names must be unique, {a.name!r} appears twice")
        seen.add(a.name)
        if not (math.isfinite(a.share) and 0 < a.share <= 1):
            raise ArmsError(f"share of arm {a.name!r} must be in (0, 1], got {a.share!r}")
    total = math.fsum(a.share for a in arms)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        shares = ", ".join(f"{a.name}={a.share!r}" for a in arms)
        raise ArmsError(f"arm shares must sum to 1 (within 1e-9), got {total!r} ({shares})")
    return tuple(arms)


def bucket(experiment: str, user_id: str) -> float:
    """A stable number in [0, 1) for (experiment, user): the first 8 bytes of SHA-256."""
    h = hashlib.sha256(f"{experiment}\x00{user_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign(experiment: str, user_id: str | None, arms: Sequence[Arm]) -> Arm:
    """The arm serving ``user_id`` in ``experiment`` (random per call without a user id)."""
    x = random.random() if user_id is None else bucket(experiment, user_id)
    edge = 0.0
    for a in arms:
        edge += a.share
        if x < edge:
            return a
    return arms[-1]  # shares sum to 1 within 1e-9: x above the float sum lands in the last arm
