"""Progress on long work: a tqdm bar on an interactive terminal, none when stderr is redirected.

A bar redraws itself with carriage returns — in a log file that is hundreds of partial lines
(~1,400 for one `csmf train`). Redirected, the bar is disabled and the caller's milestone lines
(one per epoch or stage, see ``trainer.cascade.run_epochs``) are the record instead; a caller
asks ``bar.disable`` which of the two it is.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def interactive() -> bool:
    """Whether stderr (where bars draw) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal; else a disabled one."""
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not (enabled and interactive()), **kwargs
    )
