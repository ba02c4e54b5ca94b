"""Atomic publish: build in a staging folder next to the destination, fsync, rename into place.

- Every file is written inside ``<parent>/.<name>.staging-<pid>-<token>/``; the manifest last.
  A folder without a manifest is not a bundle, and ``read_manifest`` refuses staging folders, so
  a build killed at any point leaves nothing that loads.
- New destination: ``rename(staging, dest)``.
- Existing destination: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders in one step (Linux),
  so ``dest`` is always a complete bundle, old or new; the old one is deleted afterwards. Where
  exchange is unsupported, the old bundle is first renamed aside (``.<name>.old-<token>``), a
  window of a few microseconds in which ``dest`` is absent but the old bundle is intact.
- Staging folders left by dead builds of the same destination are removed at the next build.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from csmf.atomic import fsync_path, fsync_tree
from csmf.bundle import STAGING_MARKER

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(dest: Path) -> list[Path]:
    """Remove staging folders of ``dest`` whose building process is gone."""
    removed = []
    prefix = f".{dest.name}{STAGING_MARKER}"
    if not dest.parent.is_dir():
        return removed
    for p in dest.parent.iterdir():
        if not (p.is_dir() and p.name.startswith(prefix)):
            continue
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staging_dir(dest: str | Path) -> Iterator[Path]:
    """A fresh staging folder next to ``dest`` (same filesystem, so rename is atomic). Removed
    if the body raises; the caller publishes it with :func:`publish` before leaving."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(dest)
    stage = dest.parent / f".{dest.name}{STAGING_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if stage.exists():  # body returned without publishing
        shutil.rmtree(stage, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False if the platform/filesystem can't."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def publish(stage: Path, dest: str | Path) -> Path:
    """Move the complete, manifest-bearing ``stage`` folder to ``dest`` atomically."""
    dest = Path(dest)
    fsync_tree(stage)
    if not dest.exists() and not dest.is_symlink():
        try:
            os.rename(stage, dest)
        except OSError as exc:  # lost a race with another build: fall back to replacing
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return publish(stage, dest)
    elif dest.is_dir() and not dest.is_symlink() and _exchange(stage, dest):
        fsync_path(dest.parent)
        shutil.rmtree(stage)  # now holds the previous bundle
    else:
        aside = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        os.rename(dest, aside)
        os.rename(stage, dest)
        fsync_path(dest.parent)
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()
    fsync_path(dest.parent)
    return dest
