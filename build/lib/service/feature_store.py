"""User features and history for encoding: the bundle's snapshot, optionally overlaid by Redis.

* ``bundle`` (embedded): the snapshot the builder wrote into the bundle (``Bundle.users``).
* ``redis``: an upstream pipeline writes live user data with :func:`write_user` — a hash
  ``{prefix}users`` (user id → ``{"features": {...}, "history": [...]}``) plus an entry on the
  stream ``{prefix}users:changes``. Each process mirrors the hash in memory: a full read on
  (re)connect, then it tails the stream. The request path reads the mirror, then the snapshot —
  never Redis. Redis down → the mirror keeps serving what it had, the store reports degraded, and
  the full read on reconnect catches up.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from service.sync import BackgroundSync, Health
from service.weight_store import redis_client

UserData = tuple[dict[str, Any], list[str]]


class SnapshotLike:  # the part of csmf.bundle.UserSnapshot used here
    def get(self, user_id: Any) -> UserData | None: ...


class BundleFeatureStore:
    backend = "bundle"

    def __init__(self) -> None:
        self.health = Health(up=True)

    def lookup(self, snapshot: SnapshotLike, user_id: str) -> UserData | None:
        return snapshot.get(user_id)

    def start(self) -> None:
        self.health.last_sync = 0.0

    def stop(self) -> None:
        pass


class RedisFeatureStore:
    backend = "redis"

    def __init__(
        self,
        url: str,
        prefix: str,
        interval: float,
        timeout: float,
        on_state: Callable[[bool], None] = lambda up: None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = redis_client(url, timeout)
        self.k_users = f"{prefix}users"
        self.k_changes = f"{prefix}users:changes"
        self.overlay: dict[str, UserData] = {}
        self._block_ms = max(1, int(min(interval, timeout / 2) * 1000))
        self._last_id: str | None = None  # None = (re)connect and read everything
        self._sync = BackgroundSync("features", self._step, interval, on_state, on_error)

    @property
    def health(self) -> Health:
        return self._sync.health

    def lookup(self, snapshot: SnapshotLike, user_id: str) -> UserData | None:
        live = self.overlay.get(user_id)
        return live if live is not None else snapshot.get(user_id)

    def start(self) -> None:
        self._sync.start()

    def stop(self) -> None:
        self._sync.stop()
        self.client.close()

    def _full_read(self) -> None:
        newest = self.client.xrevrange(self.k_changes, count=1)
        last = newest[0][0] if newest else "0-0"  # replay from here: nothing falls in between
        overlay = {
            uid: _decode(raw) for uid, raw in self.client.hscan_iter(self.k_users, count=1000)
        }
        self.overlay = overlay
        self._last_id = last

    def _step(self) -> None:
        try:
            if self._last_id is None:
                self._full_read()
                self._sync.mark_ok()
            resp = self.client.xread(
                {self.k_changes: self._last_id}, count=1000, block=self._block_ms
            )
            for _stream, entries in resp or ():
                uids = list({fields["user_id"] for _id, fields in entries})
                for uid, raw in zip(uids, self.client.hmget(self.k_users, uids), strict=True):
                    if raw is None:
                        self.overlay.pop(uid, None)  # deleted upstream: back to the snapshot
                    else:
                        self.overlay[uid] = _decode(raw)
                self._last_id = entries[-1][0]
            self._sync.mark_ok()
        except Exception:
            self._last_id = None
            raise


def _decode(raw: str) -> UserData:
    d = json.loads(raw)
    return dict(d.get("features") or {}), [str(h) for h in d.get("history") or ()]


def write_user(
    client,
    prefix: str,
    user_id: str,
    features: Mapping[str, Any],
    history: Sequence[str],
    maxlen: int = 100_000,
) -> None:
    """What an upstream pipeline calls to publish a user's live features/history."""
    doc = json.dumps({"features": dict(features), "history": [str(h) for h in history]})
    with client.pipeline(transaction=True) as p:
        p.hset(f"{prefix}users", user_id, doc)
        p.xadd(f"{prefix}users:changes", {"user_id": user_id}, maxlen=maxlen, approximate=True)
        p.execute()
