"""The served-and-feedback event log, in the dataset's own ``events`` schema (DESIGN §3, §10).

``CSMF_EVENT_LOG_DIR/events/part-<UTC time>-<pid>-<seq>.parquet``: a dataset's ``events/`` folder,
so ``csmf train`` reads it next to ``users.parquet`` and ``items.parquet`` (the loader concatenates
the parts). Columns ``user_id, item_id, timestamp (Unix ms), clicked, converted, request_id``:

* every item a retrieve served to a known user is one exposure row (clicked = converted = false);
* every feedback event is one more row for that (request, item): ``click`` → clicked,
  ``conversion`` → clicked and converted (the cascade converted ⇒ clicked holds by construction).
  A consumer that wants one row per impression groups by (request_id, item_id) and takes the
  maximum of the flags.

Requests never wait for the disk: they put one entry on a bounded queue (``put_nowait``; when it
is full the entry is dropped and counted — ``csmf_event_log_dropped_total``) and a writer thread
turns entries into rows. A part is written whole to ``*.tmp``, fsynced and renamed, when it holds
``rotate_rows`` rows or is ``rotate_s`` old, and on shutdown after the queue is drained — so a
clean shutdown loses nothing and a reader never sees half a file.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from csmf.atomic import atomic_write

log = logging.getLogger("csmf.service")
EVENTS = ("click", "conversion")
_STOP = object()


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
        ]
    )


class EventLog:
    def __init__(
        self,
        folder: Path,
        max_queue: int = 100_000,
        rotate_rows: int = 100_000,
        rotate_s: float = 60.0,
        on_drop: Callable[[int], None] = lambda n: None,
        on_write: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.folder = Path(folder) / "events"
        self.rotate_rows = rotate_rows
        self.rotate_s = rotate_s
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._on_drop, self._on_write = on_drop, on_write
        self._rows: list[tuple] = []
        self._since = time.monotonic()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self.parts: list[Path] = []

    # -- request side (never blocks) --------------------------------------------------------------

    def served(self, request_id: int, user_id: str, items: Sequence[str]) -> None:
        self._put(("served", request_id, user_id, int(time.time() * 1000), items), len(items))

    def feedback(self, request_id: int, user_id: str, item_id: str, event: str) -> None:
        self._put(("feedback", request_id, user_id, int(time.time() * 1000), item_id, event), 1)

    def _put(self, entry: tuple, rows: int) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._on_drop(rows)

    # -- writer thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
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

    def _run(self) -> None:
        while True:
            wait = max(0.05, self.rotate_s - (time.monotonic() - self._since))
            try:
                entry = self._queue.get(timeout=wait)
            except queue.Empty:
                entry = None
            if entry is _STOP:
                self._flush()
                return
            if entry is not None:
                self._rows.extend(_rows(entry))
            if len(self._rows) >= self.rotate_rows or (
                self._rows and time.monotonic() - self._since >= self.rotate_s
            ):
                self._flush()

    def _flush(self) -> None:
        rows, self._rows = self._rows, []
        self._since = time.monotonic()
        if not rows:
            return
        try:
            self._write(rows)
        except Exception:  # a full disk must not kill the thread; the rows are reported lost
            log.exception("event log: could not write %d rows to %s", len(rows), self.folder)
            self._on_drop(len(rows))

    def _write(self, rows: list[tuple]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schema()
        cols = list(zip(*rows, strict=True))
        table = pa.table([pa.array(c, f.type) for c, f in zip(cols, schema, strict=True)], schema)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self._seq += 1
        path = self.folder / f"part-{stamp}-{os.getpid()}-{self._seq:06d}.parquet"
        atomic_write(path, lambda fh: pq.write_table(table, fh))
        self.parts.append(path)
        self._on_write(len(rows))


def _rows(entry: tuple) -> list[tuple]:
    if entry[0] == "served":
        _, rid, user, ms, items = entry
        return [(user, item, ms, False, False, rid) for item in items]
    _, rid, user, ms, item, event = entry
    return [(user, item, ms, True, event == "conversion", rid)]
