"""The served-and-feedback event log, in the dataset's own ``events`` schema
(docs/design.md#tune-experiment-feedback).

``CSMF_EVENT_LOG_DIR/events/part-<UTC time>-<writer>-<seq>.parquet``: a dataset's ``events/``
folder, so ``csmf train`` reads it next to ``users.parquet`` and ``items.parquet`` (the loader
concatenates the parts). Columns ``user_id, item_id, timestamp (Unix ms), clicked, converted,
request_id, cold_start``:

* every item a retrieve served is one exposure row (clicked = converted = false);
* every feedback event is one more row for that (request, item): ``click`` → clicked,
  ``conversion`` → clicked and converted (the cascade converted ⇒ clicked holds by construction).
  A consumer that wants one row per impression groups by (request_id, item_id) and takes the
  maximum of the flags.
* ``cold_start`` is the response's: the service had neither features nor a usable history for
  the user (an unknown ``user_id``); a history-only request is logged with ``user_id`` null. A
  trainer has no user row to learn from for either: the dataset loader recognises an event log by
  its ``cold_start`` column and skips such rows — and any row whose user or item is missing from
  the dataset's tables — saying how many (trainer/data/dataset.py), so no request can make the log
  untrainable.

Requests never wait for the disk: they put one entry on a bounded queue (``put_nowait``; when it
is full the entry is dropped and counted — ``csmf_event_log_dropped_total``) and a writer thread
turns entries into rows.

**Crash safety.** The writer appends every entry to an append-only spool file
(``CSMF_EVENT_LOG_DIR/spool/<writer>-<seq>.jsonl``, one JSON line per entry) and fsyncs it at
least every ``sync_s`` seconds (``CSMF_EVENT_LOG_SYNC_S``, default 0.2) while it has unsynced
entries. So an event the service accepted is on disk within ``sync_s`` plus the time the writer
needs to reach it in the queue (milliseconds unless the queue is backed up); a ``kill -9``, an
OOM kill or a power cut loses at most that window (tests/reliability/test_event_log_crash.py
measures it). A part is written whole to ``*.tmp``, fsynced and renamed when it holds
``rotate_rows`` rows or is ``rotate_s`` old, and on shutdown; only then is its spool removed.

On start, every spool whose writer is gone (each live writer holds an exclusive ``flock`` on its
current spool) is replayed into the part it would have become — named by the dead writer and
sequence number, so a replay after a crash between "part renamed" and "spool removed" finds the
part and writes nothing twice — and leftover ``*.tmp`` files of dead writers are swept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from csmf.atomic import atomic_write, fsync_path

if TYPE_CHECKING:  # the log itself needs neither: only open_event_log reads them
    from service.metrics import ServiceMetrics
    from service.settings import Settings

log = logging.getLogger("csmf.service")
EVENTS = ("click", "conversion")
COLUMNS = ("user_id", "item_id", "timestamp", "clicked", "converted", "request_id", "cold_start")
_STOP = object()
_SPOOL = re.compile(r"^(?P<writer>\d+-[0-9a-f]+)-(?P<seq>\d{6})\.jsonl$")
_TMP_WRITER = re.compile(r"^\.part-[^-]+-(?P<writer>\d+-[0-9a-f]+)-\d{6}\.parquet\..*\.tmp$")


class EventLogError(OSError):
    """The event-log folder cannot be used (not a folder, not writable)."""


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("timestamp", pa.int64()),
            ("clicked", pa.bool_()),
            ("converted", pa.bool_()),
            ("request_id", pa.int64()),
            ("cold_start", pa.bool_()),
        ]
    )


class _Spool:
    """One writer's append-only file for one part, held under an exclusive flock while open."""

    def __init__(self, folder: Path, writer: str, seq: int) -> None:
        self.path = folder / f"{writer}-{seq:06d}.jsonl"
        self.fh = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.dirty = False

    def append(self, lines: Iterable[bytes]) -> None:
        self.fh.writelines(lines)
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.dirty = False

    def close(self, remove: bool) -> None:
        if remove:  # unlink while still locked: a sweeper never sees it unlocked and present
            self.path.unlink(missing_ok=True)
        self.fh.close()


def open_event_log(settings: Settings, metrics: ServiceMetrics) -> EventLog | None:
    """The log ``settings`` ask for (``CSMF_EVENT_LOG_*``), started, with its drops and writes
    counted on /metrics; None without ``CSMF_EVENT_LOG_DIR``."""
    s = settings
    if s.event_log_dir is None:
        return None
    event_log = EventLog(
        s.event_log_dir, s.event_log_queue, s.event_log_rotate_rows, s.event_log_rotate_s,
        on_drop=metrics.event_log_dropped_total.inc, on_write=metrics.event_log_rows_total.inc,
        sync_s=s.event_log_sync_s,
    )  # fmt: skip
    event_log.start()
    return event_log


def prepare_folder(root: Path) -> None:
    """Create the log's folders under ``root`` (``events/``, ``spool/``), or raise
    :class:`EventLogError` naming the path that is a file, cannot be created or is not writable
    (``csmf serve`` calls it before starting, so that is one ``error:`` line, not a traceback)."""
    root = Path(root)
    for d in (root, root / "events", root / "spool"):
        if d.exists() and not d.is_dir():
            raise EventLogError(f"event log: {d} exists and is not a folder (CSMF_EVENT_LOG_DIR)")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EventLogError(
                f"event log: cannot create {d}: {exc.strerror} (CSMF_EVENT_LOG_DIR)"
            ) from None
        if not os.access(d, os.W_OK | os.X_OK):
            raise EventLogError(f"event log: {d} is not writable (CSMF_EVENT_LOG_DIR)")


class EventLog:
    def __init__(
        self,
        folder: Path,
        max_queue: int = 100_000,
        rotate_rows: int = 100_000,
        rotate_s: float = 60.0,
        on_drop: Callable[[int], None] = lambda n: None,
        on_write: Callable[[int], None] = lambda n: None,
        sync_s: float = 0.2,
    ) -> None:
        self.root = Path(folder)
        self.folder = self.root / "events"
        self.spool_dir = self.root / "spool"
        self.rotate_rows = rotate_rows
        self.rotate_s = rotate_s
        self.sync_s = sync_s
        self.writer = f"{os.getpid()}-{secrets.token_hex(3)}"
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._on_drop, self._on_write = on_drop, on_write
        self._rows: list[tuple] = []
        self._since = time.monotonic()
        self._synced = time.monotonic()
        self._seq = 0
        self._spool: _Spool | None = None
        self._thread: threading.Thread | None = None
        self.parts: list[Path] = []
        self.recovered = {"spools": 0, "rows": 0, "tmp_removed": 0}

    # -- request side (never blocks) --------------------------------------------------------------

    def served(
        self, request_id: int, user_id: str | None, items: Sequence[str], cold: bool = False
    ) -> None:
        """``items`` served for ``user_id`` (None: a history-only request); ``cold``: the service
        had no features for the user (logged with ``cold_start`` true)."""
        ms = int(time.time() * 1000)
        self._put(["s", request_id, user_id, ms, list(items), bool(cold)], len(items))

    def feedback(
        self, request_id: int, user_id: str | None, item_id: str, event: str, cold: bool = False
    ) -> None:
        ms = int(time.time() * 1000)
        self._put(["f", request_id, user_id, ms, item_id, event, bool(cold)], 1)

    def _put(self, entry: list, rows: int) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._on_drop(rows)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the folder, recover what dead writers left (spools, ``*.tmp``), start writing."""
        prepare_folder(self.root)
        self._recover()
        self._spool = _Spool(self.spool_dir, self.writer, self._seq + 1)
        self._thread = threading.Thread(target=self._run, name="csmf-event-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, write the last part, stop the thread (a clean shutdown loses nothing)."""
        if self._thread is None:
            return
        try:  # behind every entry already queued; the writer is draining, so room comes soon
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("event log: writer did not drain the queue within %.0fs", timeout)
            return
        self._thread.join(timeout)
        self._thread = None

    # -- writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            wait = self.rotate_s - (now - self._since)
            if self._spool.dirty:
                wait = min(wait, self.sync_s - (now - self._synced))
            try:
                entries = [self._queue.get(timeout=max(0.005, wait))]
            except queue.Empty:
                entries = []
            while entries and len(entries) < 1024:  # group commit: whatever else is queued
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = bool(entries) and entries[-1] is _STOP
            if stop:
                entries.pop()
            self._take(entries)
            if stop:
                self._flush(last=True)
                return
            if len(self._rows) >= self.rotate_rows or (
                self._rows and time.monotonic() - self._since >= self.rotate_s
            ):
                self._flush()

    def _take(self, entries: list) -> None:
        if entries:
            self._spool.append(
                json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries
            )
            for e in entries:
                self._rows.extend(_rows(e))
        if self._spool.dirty and time.monotonic() - self._synced >= self.sync_s:
            try:
                self._spool.sync()
            except OSError:  # a full disk must not kill the thread; the part write retries
                log.exception("event log: could not sync the spool %s", self._spool.path)
            self._synced = time.monotonic()

    def _flush(self, last: bool = False) -> None:
        rows, self._rows = self._rows, []
        self._since = time.monotonic()
        if not rows:
            if last:
                self._spool.close(remove=True)
            return
        old, seq = self._spool, self._seq + 1
        if not last:
            self._spool = _Spool(self.spool_dir, self.writer, seq + 1)
        try:
            self._write(rows, self.writer, seq)
        except Exception:  # a full disk must not kill the thread; the spool keeps the rows
            with contextlib.suppress(OSError):
                old.sync()
            log.exception(
                "event log: could not write %d rows to %s; they stay in %s and are written by the "
                "next start",
                len(rows),
                self.folder,
                old.path,
            )
            old.close(remove=False)
        else:
            old.close(remove=True)
        self._seq = seq

    def _write(self, rows: list[tuple], writer: str, seq: int) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schema()
        cols = list(zip(*rows, strict=True))
        table = pa.table([pa.array(c, f.type) for c, f in zip(cols, schema, strict=True)], schema)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.folder / f"part-{stamp}-{writer}-{seq:06d}.parquet"
        atomic_write(path, lambda fh: pq.write_table(table, fh))
        self.parts.append(path)
        self._on_write(len(rows))
        return path

    # -- recovery (on start) ----------------------------------------------------------------------

    def _recover(self) -> None:
        """Replay the spools of dead writers into parts; remove dead writers' ``*.tmp`` files."""
        live: set[str] = set()
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            m = _SPOOL.match(path.name)
            if m is None:
                continue
            if not self._replay(path, m["writer"], int(m["seq"])):
                live.add(m["writer"])
        for tmp in self.folder.glob(".part-*.tmp"):
            m = _TMP_WRITER.match(tmp.name)
            if m is None or m["writer"] not in live:
                tmp.unlink(missing_ok=True)
                self.recovered["tmp_removed"] += 1
        if any(self.recovered.values()):
            log.warning(
                "event log: recovered %(rows)d rows from %(spools)d spool file(s) of stopped "
                "writers, removed %(tmp_removed)d leftover .tmp file(s)",
                self.recovered,
            )

    def _replay(self, path: Path, writer: str, seq: int) -> bool:
        """Turn a dead writer's spool into its part; False if a live writer holds it."""
        try:
            fh = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return True
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:  # locked, but another sweeper may have replayed and unlinked it meanwhile
                if os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino:
                    return True
            except FileNotFoundError:
                return True
            if not any(self.folder.glob(f"part-*-{writer}-{seq:06d}.parquet")):
                rows = [r for e in _entries(fh.read()) for r in _rows(e)]
                if rows:
                    self._write(rows, writer, seq)
                    self.recovered["rows"] += len(rows)
            self.recovered["spools"] += 1
            path.unlink()
        fsync_path(self.spool_dir)
        return True


def _entries(data: bytes) -> list[list]:
    """The spool's entries; a last line cut by the crash (or any unreadable line) is skipped."""
    out = []
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _rows(entry: list) -> list[tuple]:
    if entry[0] == "s":
        _, rid, user, ms, items, cold = entry
        return [(user, item, ms, False, False, rid, cold) for item in items]
    _, rid, user, ms, item, event, cold = entry
    return [(user, item, ms, True, event == "conversion", rid, cold)]
