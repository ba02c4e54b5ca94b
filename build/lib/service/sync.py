"""A background thread that keeps a local copy of a shared store in sync, and its health.

The request path only ever reads the local copy. The thread calls ``step()`` in a loop; an
exception marks the store degraded (the last known state keeps serving), counts an error, and the
loop retries every ``interval`` until ``step()`` succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("csmf.service")


@dataclass
class Health:
    up: bool = False
    error: str | None = None
    last_sync: float = 0.0  # unix time of the last successful sync
    since: float = 0.0  # unix time of the last up/down transition

    def as_dict(self) -> dict:
        return {
            "state": "ok" if self.up else "degraded",
            "error": self.error,
            "last_sync_age_s": round(time.time() - self.last_sync, 3) if self.last_sync else None,
        }


class BackgroundSync:
    """Runs ``step`` repeatedly on a daemon thread; ``step`` blocks for at most ~``interval``."""

    def __init__(
        self,
        name: str,
        step: Callable[[], None],
        interval: float,
        on_state: Callable[[bool], None],
        on_error: Callable[[], None],
    ) -> None:
        self.name = name
        self.health = Health()
        self._step = step
        self._interval = interval
        self._on_state = on_state
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def mark_ok(self) -> None:
        h = self.health
        h.last_sync = time.time()
        if not h.up:
            if h.since:
                log.warning("%s store back in sync", self.name)
            h.up, h.error, h.since = True, None, h.last_sync
            self._on_state(True)

    def mark_failed(self, exc: BaseException) -> None:
        h = self.health
        self._on_error()
        msg = f"{type(exc).__name__}: {exc}"
        if h.up or not h.since:
            log.warning("%s store degraded, serving the last known state: %s", self.name, msg)
            h.since = time.time()
        h.up, h.error = False, msg
        self._on_state(False)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"csmf-sync-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if asked to stop meanwhile."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # any failure: keep serving, report, retry
                self.mark_failed(exc)
                self._stop.wait(self._interval)
