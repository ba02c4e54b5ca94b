"""Input pipeline off the critical path: a background thread runs a batch iterator (Parquet
decoding, id lookup, shuffling, history assembly) ``depth`` batches ahead of the training step.

The producer must not share a random generator with the consumer: the cascade draws every
shared-rng value of an epoch (its permutation, its shuffle seed) before handing the iterator
over, so prefetching changes when work happens, never what is produced. ``wait_seconds`` is the
time the step spent waiting for data — the share the benchmark reports.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``source`` in a daemon thread, ``depth`` items ahead (``depth`` 0: inline).
    Exceptions raised by the producer are re-raised in the consumer; :meth:`close` (or leaving a
    ``with`` block) stops the producer early."""

    def __init__(self, source: Iterable[T], depth: int) -> None:
        self.wait_seconds = 0.0
        self._source, self._depth = source, depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="csmf-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer, raised there
            self._put(_Raised(exc))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        if self._thread is None:
            it = iter(self._source)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.wait_seconds += time.perf_counter() - t0
                yield item
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
