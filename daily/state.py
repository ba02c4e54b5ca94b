"""The state folder of ``csmf daily``: where runs and bundles live, which one serves, and how an
update becomes visible in one step.

    STATE/
      data/<gen>/           the frozen snapshot of the data folder the update read
      runs/<gen>/           finished runs (checkpoint.pt, train_metrics.json, gate.json)
      bundles/<gen>/        verified bundles
      bundles/current       symlink → <gen>: THE serving model (`csmf serve --bundle
                            STATE/bundles/current`); its run is runs/<gen>
      partial-<gen>/        an update in progress: run/, bundle/, step (the step it reached)
      refused/<gen>/        the last candidate the quality gate refused (for inspection)
      status.json           the last attempt and the last success (what the metrics report)
      .lock                 held (flock) by the one update running

``<gen>`` is the UTC start time of the update (``20261206T030000Z``). An update works only inside
its ``partial-<gen>`` folder; once its bundle is built it renames ``run/`` and ``bundle/`` to
their new names under ``runs/`` and ``bundles/`` (new names: nothing existing is touched),
verifies the bundle there, and then swaps the ``current`` symlink atomically (a new symlink
renamed over the old one, the folder fsynced): that rename is the commit. Killed at any moment
before it, the previous run and the serving bundle are untouched and ``current`` still names
them; the next update finds the ``partial-*`` folder, removes it and whatever it had moved under
``runs/`` and ``bundles/`` without committing, and says so.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from csmf.atomic import atomic_write_text, fsync_path
from csmf.errors import CsmfError

CURRENT = "current"
PARTIAL_PREFIX = "partial-"
STATUS_NAME = "status.json"


class StateError(CsmfError, ValueError):
    """The state folder cannot be used (another update holds it, it is not writable, a pointer
    names a bundle that does not exist)."""


@dataclass(frozen=True)
class Recovered:
    """A ``partial-*`` folder left by an update that did not finish, and what was done."""

    gen: str
    step: str
    removed: tuple[str, ...]
    committed: bool  # it had published (the pointer names it) and died after

    def message(self) -> str:
        if self.committed:
            return (
                f"an earlier update ({self.gen}) stopped during its {self.step!r} step after "
                f"publishing; removed {', '.join(self.removed)}; replicas may still need the "
                "reload this update now sends"
            )
        return (
            f"an earlier update ({self.gen}) stopped during its {self.step!r} step without "
            f"publishing; removed {', '.join(self.removed)}; the serving model was not touched"
        )


class State:
    """One state folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.data = self.root / "data"
        self.bundles = self.root / "bundles"
        self.status_path = self.root / STATUS_NAME
        self._lock: IO[bytes] | None = None

    # -- locking ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the update lock (flock: released by the kernel if the process dies)."""
        for d in (self.root, self.data, self.runs, self.bundles):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(f"cannot create {d}: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK):
            raise StateError(f"state folder {self.root} is not writable")
        fh = open(self.root / ".lock", "a+b")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().decode(errors="replace").strip() or "?"
            fh.close()
            raise StateError(
                f"another csmf daily is updating {self.root} (pid {holder}); one update at a time"
            ) from None
        fh.truncate(0)
        fh.write(str(os.getpid()).encode())
        fh.flush()
        self._lock = fh

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- the serving generation --------------------------------------------------------------

    def current(self) -> str | None:
        """The serving generation (the target of ``bundles/current``), None before the first."""
        link = self.bundles / CURRENT
        if not link.is_symlink():
            if link.exists():
                raise StateError(
                    f"{link} must be a symlink to a bundle folder, found a file/folder"
                )
            return None
        gen = os.readlink(link)
        if "/" in gen or not (self.bundles / gen / "manifest.json").exists():
            raise StateError(f"{link} points at {gen!r}, which is not a bundle in {self.bundles}")
        return gen

    def run_of(self, gen: str) -> Path:
        return self.runs / gen

    def bundle_of(self, gen: str) -> Path:
        return self.bundles / gen

    def data_of(self, gen: str) -> Path:
        return self.data / gen

    def commit(self, gen: str) -> None:
        """Point ``bundles/current`` at ``gen`` in one rename (the update's commit point)."""
        tmp = self.bundles / f".{CURRENT}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(gen, tmp)
        os.replace(tmp, self.bundles / CURRENT)
        fsync_path(self.bundles)

    # -- updates in progress -------------------------------------------------------------------

    def new_gen(self) -> str:
        base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        gen, k = base, 1
        while any(p.exists() for p in self._paths(gen)):
            k += 1
            gen = f"{base}-{k}"
        return gen

    def _paths(self, gen: str) -> tuple[Path, ...]:
        return (
            self.partial(gen), self.data_of(gen), self.run_of(gen), self.bundle_of(gen),
            self.root / "refused" / gen,
        )  # fmt: skip

    def partial(self, gen: str) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{gen}"

    def start(self, gen: str) -> Path:
        p = self.partial(gen)
        p.mkdir()
        self.mark(gen, "start")
        return p

    def mark(self, gen: str, step: str) -> None:
        """Record the step an update is in (what a later recovery reports)."""
        atomic_write_text(self.partial(gen) / "step", step + "\n")

    def finish(self, gen: str) -> None:
        shutil.rmtree(self.partial(gen), ignore_errors=True)

    def recover(self) -> list[Recovered]:
        """Remove what updates that died left behind (see the module docstring). Never touches
        the serving generation."""
        gens = [p.name[len(PARTIAL_PREFIX) :] for p in sorted(self.root.glob(PARTIAL_PREFIX + "*"))]
        return [self.recover_one(gen) for gen in gens]

    def recover_one(self, gen: str) -> Recovered:
        """Remove update ``gen``'s partial folder and, unless it was committed, what it had
        already moved under data/, runs/ and bundles/."""
        p = self.partial(gen)
        step_file = p / "step"
        step = step_file.read_text().strip() if step_file.exists() else "start"
        removed = [p.name]
        committed = gen == self.current()
        if not committed:  # moved or created under the state, never committed
            for moved in (self.data_of(gen), self.run_of(gen), self.bundle_of(gen)):
                if moved.exists():
                    shutil.rmtree(moved)
                    removed.append(str(moved.relative_to(self.root)))
        shutil.rmtree(p)
        return Recovered(gen, step, tuple(removed), committed)

    def keep_refused(self, gen: str, run: Path) -> Path:
        """Move a refused candidate's run to ``refused/<gen>`` (only the latest is kept)."""
        refused = self.root / "refused"
        if refused.exists():
            for old in refused.iterdir():  # the previous refused candidate and its snapshot
                shutil.rmtree(self.data_of(old.name), ignore_errors=True)
            shutil.rmtree(refused)
        refused.mkdir()
        dest = refused / gen
        os.replace(run, dest)
        return dest

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Remove all but the ``keep`` newest generations, never one in ``protect`` (the serving
        one, and any a replica may still serve). Returns the removed generations."""
        gens = sorted(
            p.name for p in self.bundles.iterdir() if p.is_dir() and not p.is_symlink()
            and not p.name.startswith(".")
        )  # fmt: skip
        removed = []
        for gen in gens[: max(0, len(gens) - keep)]:
            if gen in protect:
                continue
            for folder in (self.bundle_of(gen), self.run_of(gen), self.data_of(gen)):
                shutil.rmtree(folder, ignore_errors=True)
            removed.append(gen)
        return removed
