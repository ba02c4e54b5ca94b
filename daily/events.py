"""Reading the new events: a frozen snapshot of the data folder for one update.

The service keeps appending parts to its event log while the update runs (minutes to hours), and
``csmf build-index`` refuses a dataset whose content changed since training. So the update first
takes a snapshot into ``STATE/data/<gen>``: every dataset file is hard-linked (event-log parts are
written once, atomically, and never modified, so a link is an immutable copy that costs no
space), copied when the state lives on another file system. Training, the gate and the bundle all
read the snapshot; the run's checkpoint names it, so ``csmf eval`` of a published run still works.
Hidden files (a writer's ``.part-*.tmp``) are never taken.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from csmf.atomic import fsync_tree
from csmf.errors import DataError

# What a dataset folder may hold (trainer/data/dataset.py); anything else is left behind.
ENTRIES = (
    "events.parquet", "events", "users.parquet", "items.parquet", "candidates.parquet",
    "truth.npz", "dataset.json",
)  # fmt: skip


def snapshot(data: Path, out: Path) -> dict[str, int]:
    """Freeze ``data`` into ``out`` (new folder); returns {"files", "copied"} counts."""
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist (or is not a folder)")
    out.mkdir(parents=True)
    counts = {"files": 0, "copied": 0}
    for name in ENTRIES:
        src = data / name
        if src.is_dir():
            (out / name).mkdir()
            for f in sorted(src.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    _link(f, out / name / f.name, counts)
        elif src.is_file():
            _link(src, out / name, counts)
    fsync_tree(out)
    return counts


def _link(src: Path, dst: Path, counts: dict[str, int]) -> None:
    counts["files"] += 1
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a real copy
        shutil.copy2(src, dst)
        counts["copied"] += 1
