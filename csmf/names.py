"""Scenario and experiment-arm names, one rule for the service and its clients: 1-64 characters
of letters, digits, ``_``, ``.`` and ``-``, the first a letter or digit, matched against the
*whole* string (``fullmatch``: a ``$`` anchor would also accept a trailing newline, which would
then reach URLs and /metrics labels).
"""

from __future__ import annotations

import re

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
NAME_RULE = "1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)


def is_name(name: object) -> bool:
    """True if ``name`` is a valid scenario or arm name."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None
