"""Feedback exactly once per (request id, item, event): the first report is recorded, a replay is
answered ``"duplicate": true`` and neither counted nor logged again.

The guarantee depends on where the "seen" marks live:

* **Redis** (``CSMF_REDIS_URL`` set): ``SET key 1 NX PX <rest of the request id's lifetime>``
  — atomic, so exactly once across every worker and replica that shares the Redis, for as long as
  the request id is accepted (``CSMF_FEEDBACK_TTL_S``). If Redis does not answer, the mark falls
  back to this process (below) for that report and the error is logged.
* **In process** (no Redis): exactly once per worker process while it runs, for the request id's
  lifetime or until ``max_local`` marks are held (the oldest are forgotten first). Replays that
  reach another worker, or come after a restart, are recorded again: with several workers or
  replicas, set ``CSMF_REDIS_URL``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

log = logging.getLogger("csmf.service")


class FeedbackOnce:
    def __init__(
        self, redis_url: str | None, prefix: str, timeout: float, max_local: int = 1_000_000
    ) -> None:
        self.backend = "redis" if redis_url else "process"
        self._redis = None
        if redis_url:
            from service.weight_store import redis_client

            self._redis = redis_client(redis_url, timeout)
        self._prefix = f"{prefix}feedback:"
        self._local: dict[str, float] = {}  # key → monotonic expiry, in insertion order
        self._lock = threading.Lock()
        self.max_local = max_local

    def first(self, request_id: int, item_id: str, event: str, ttl_s: float) -> bool:
        """True the first time (request_id, item_id, event) is seen within ``ttl_s`` seconds."""
        digest = hashlib.blake2b(item_id.encode(), digest_size=12).hexdigest()
        key = f"{request_id:x}:{event}:{digest}"
        if self._redis is not None:
            import redis

            try:
                ms = max(1, int(ttl_s * 1000))
                return bool(self._redis.set(self._prefix + key, 1, nx=True, px=ms))
            except redis.RedisError as exc:
                log.error("feedback dedupe: Redis unavailable (%s); deduplicating in process", exc)
        return self._first_local(key, ttl_s)

    def _first_local(self, key: str, ttl_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            expiry = self._local.get(key)
            if expiry is not None and expiry > now:
                return False
            self._local.pop(key, None)
            self._local[key] = now + ttl_s
            if len(self._local) > self.max_local:
                self._prune(now)
            return True

    def _prune(self, now: float) -> None:
        for k in [k for k, e in self._local.items() if e <= now]:
            del self._local[k]
        while len(self._local) > self.max_local:  # still full: forget the oldest
            del self._local[next(iter(self._local))]

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
