"""Publishing one file atomically: readers see the old file or the new one, never half of one.

Every file csmf publishes in place (checkpoints, resume states, manifests, metrics and results
JSON, the scenarios file, event-log parts, the reload announcement, downloaded data) goes through
:func:`atomic_write`: the content is written to a temporary file in the same folder (a rename is
atomic only within one filesystem), flushed and fsynced, renamed over the target with
``os.replace``, and the folder is fsynced so the rename itself survives a crash. If the writer
raises, the temporary file is removed and the old file is untouched.

Folders published whole (bundles, datasets) stage into a sibling folder instead
(``index_builder.publish``, ``trainer.data.dataset``); they use :func:`fsync_tree` and
:func:`fsync_path` from here.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder below ``folder``, then ``folder``: a staged folder is on disk
    before it is renamed into place (bundles, datasets)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*"), reverse=True):  # children before their folders
        if p.is_file() or (p.is_dir() and not p.is_symlink()):
            fsync_path(p)
    fsync_path(folder)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Publish ``path``: ``write(fh)`` fills a binary temp file beside it, then fsync, rename,
    fsync the folder. Temp names are hidden and unique per call (``.<name>.<pid>.<random>.tmp``),
    so concurrent writers (server workers) never share one and globs such as ``part-*.parquet``
    never see one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0o666 minus the umask: what open() gives the file a plain write would create
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (numpy scalars as floats), published atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=float) + "\n")
