"""The ``--out`` folder of the commands that write one — ``csmf data`` (a dataset), ``csmf train``
(a run), ``csmf build-index`` (a bundle) — checked before any work.

A command replaces only what it writes itself: an ``--out`` that does not exist yet (its parent
must be a writable folder), an empty folder, or a folder holding that kind of output (a bundle's
``manifest.json``, a run's ``checkpoint.pt``, a dataset's ``dataset.json`` ...). A non-empty
folder holding anything else is refused unless ``--force``; a file is always refused (no command
writes a file there, so replacing it is never what was meant: remove it first). Each refusal is a
:class:`OutFolderError`, which the commands print as one ``error:`` line with exit code 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from csmf.errors import CsmfError

# What marks a folder as each command's own output (any one of the names).
MARKERS: dict[str, tuple[str, ...]] = {
    "bundle": ("manifest.json",),
    "run": ("checkpoint.pt", "resume.pt", "train_metrics.json"),
    "dataset": ("dataset.json", "events.parquet", "events"),
}


class OutFolderError(CsmfError, ValueError):
    """``--out`` names something the command must not replace, or a place it cannot write."""


def check_out(out: str | Path, kind: str, force: bool = False) -> Path:
    """Raise :class:`OutFolderError` unless ``kind``'s command may write ``out`` (see module)."""
    out = Path(out)
    if kind not in MARKERS:
        raise ValueError(f"kind must be one of {sorted(MARKERS)}, got {kind!r}")
    if out.is_symlink() and not out.exists():
        raise OutFolderError(f"--out {out} is a broken symlink; remove it or choose another --out")
    if out.exists():
        if not out.is_dir():
            raise OutFolderError(
                f"--out {out} is a file, not a {kind} folder; the command never replaces a file "
                "(remove it first or choose another --out)"
            )
        _probe(out, out)
        entries = sorted(os.listdir(out))
        if entries and not force and not any((out / m).exists() for m in MARKERS[kind]):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutFolderError(
                f"--out {out} is a folder with {len(entries)} entries ({shown}) and no {kind} "
                f"in it; writing the {kind} there would replace them: pass --force to do so or "
                "choose another --out"
            )
        return out
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutFolderError(f"--out {out}: cannot create it, {parent} is a file")
    _probe(parent, out)
    return out


def _probe(folder: Path, out: Path) -> None:
    """Create and remove a folder in ``folder``: the one test of writability that also holds
    for root, read-only mounts and pseudo file systems such as /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".csmf-probe-", dir=folder))
    except OSError as exc:
        raise OutFolderError(
            f"--out {out}: cannot write in {folder} ({exc.strerror or exc})"
        ) from None
