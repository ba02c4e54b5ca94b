"""Item writes across workers and replicas (docs/design.md#item-writes).

The records themselves travel through the item log beside the bundle (a file every replica of a
bundle reads: the same machine, or a shared volume); what travels through Redis is the log
*position* and who has applied it:

- ``{prefix}items:{log}:seq``: the highest record seq acknowledged by any writer;
- ``{prefix}items:{log}:applied``: a hash replica id → the last seq that replica applied;
- ``{prefix}items:{log}:folded``: a hash replica id → the seq its bundle folded in (the
  manifest's ``items_log.applied_seq``: what a reload of that bundle replays from);
- ``{prefix}items:{log}:alive``: a sorted set replica id → its last heartbeat (ms): replicas
  whose heartbeat is older than ``ALIVE_S`` are presumed gone (a stopped worker stops counting).

``{log}`` is the item log's file name: replicas serving another bundle (another log, whose seqs
mean something else) neither hold this one's acknowledgements back nor chase its positions.

Every worker runs a sync thread: it catches up when the log grew or Redis names a newer seq,
then heartbeats its applied seq, then waits for a writer's announcement on
``{prefix}items:{log}:changed`` (pub/sub) or ``sync_interval_s``, whichever comes first. A writer appends and fsyncs the record,
applies it, publishes its seq, and acknowledges only once every live replica has applied it (at
most ``items_visible_timeout_s``; else 503, the write being durable and still on its way) — so a
deleted item is not returned by any replica after its delete is acknowledged.

Without Redis, the workers of one ``csmf serve --workers N`` heartbeat through files in the
control folder instead (same rule); a single process has no one to wait for.

**Truncating the log.** A compacted bundle folds the records up to ``S``; once every replica
heard from in the last ``RETAIN_S`` serves a bundle that folded at least ``S`` (none can need
an earlier record, not even to reload its own bundle), the first worker to see it truncates the
log (``ItemLog.truncate``: atomic, under the append lock). Replicas that reload at different
times just hold it back. A replica silent for longer than ``RETAIN_S`` that comes back on an
older bundle cannot replay it: it reports the item log degraded, naming the compacted bundle,
and keeps serving what it had — it never applies a record twice nor skips one silently.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Protocol

from service.errors import StoreUnavailableError
from service.sync import BackgroundSync

log = logging.getLogger("csmf.service")
ALIVE_S = 3.0  # a replica silent for longer no longer holds acknowledgements back
RETAIN_S = 10 * ALIVE_S  # a replica silent for longer no longer holds the log's records back


class Registry(Protocol):
    def heartbeat(self, log: str, replica: str, seq: int, folded: int = 0) -> None: ...
    def min_folded(self, log: str) -> int | None: ...
    def publish(self, log: str, seq: int) -> None: ...
    def target(self, log: str) -> int: ...
    def lagging(self, log: str, seq: int) -> list[str]: ...
    def wait(self, log: str, timeout: float) -> bool: ...


class RedisRegistry:
    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        from service.weight_store import redis_client

        self.client = redis_client(url, timeout)
        self.prefix = prefix
        self._pubsub = None
        self._subscribed: str | None = None
        self._max = self.client.register_script(
            "local c = tonumber(redis.call('GET', KEYS[1]) or '0') "
            "if tonumber(ARGV[1]) > c then redis.call('SET', KEYS[1], ARGV[1]) end return 1"
        )

    def _key(self, log: str, what: str) -> str:
        return f"{self.prefix}items:{log}:{what}"

    def heartbeat(self, log: str, replica: str, seq: int, folded: int = 0) -> None:
        now = int(time.time() * 1000)
        alive = self._key(log, "alive")
        p = self.client.pipeline(transaction=False)
        p.hset(self._key(log, "applied"), replica, seq)
        p.hset(self._key(log, "folded"), replica, folded)
        p.zadd(alive, {replica: now})
        p.zremrangebyscore(alive, "-inf", now - int(RETAIN_S * 1000))
        p.execute()

    def min_folded(self, log: str) -> int | None:
        """The least seq folded into the bundle of any replica heard from in RETAIN_S."""
        now = int(time.time() * 1000)
        seen = self.client.zrangebyscore(
            self._key(log, "alive"), now - int(RETAIN_S * 1000), "+inf"
        )
        if not seen:
            return None
        folded = self.client.hmget(self._key(log, "folded"), seen)
        return min(int(f or 0) for f in folded)  # a replica that never said: 0

    def publish(self, log: str, seq: int) -> None:
        self._max(keys=[self._key(log, "seq")], args=[seq])
        self.client.publish(self._key(log, "changed"), seq)  # wakes the others' sync threads

    def wait(self, log: str, timeout: float) -> bool:
        """Block until a writer announces a record on ``log`` (True) or ``timeout`` passes."""
        if self._pubsub is None or self._subscribed != log:
            if self._pubsub is not None:
                self._pubsub.close()
            self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(self._key(log, "changed"))
            self._subscribed = log
        got = self._pubsub.get_message(timeout=timeout) is not None
        while got and self._pubsub.get_message(timeout=0) is not None:
            pass  # several records announced meanwhile: one catch-up reads them all
        return got

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()

    def target(self, log: str) -> int:
        return int(self.client.get(self._key(log, "seq")) or 0)

    def lagging(self, log: str, seq: int) -> list[str]:
        now = int(time.time() * 1000)
        alive = self.client.zrangebyscore(
            self._key(log, "alive"), now - int(ALIVE_S * 1000), "+inf"
        )
        if not alive:
            return []
        applied = self.client.hmget(self._key(log, "applied"), alive)
        return [r for r, a in zip(alive, applied, strict=True) if int(a or 0) < seq]


class FileRegistry:
    """The workers of one server: a small file per worker in the control folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder) / "items"
        self.folder.mkdir(parents=True, exist_ok=True)

    def heartbeat(self, log: str, replica: str, seq: int, folded: int = 0) -> None:
        p = self.folder / f"{replica}.json"
        tmp = p.with_suffix(f".{secrets.token_hex(3)}.tmp")
        doc = {"log": log, "seq": seq, "folded": folded}
        tmp.write_text(json.dumps(doc))  # ephemeral state: no fsync
        os.replace(tmp, p)

    def _workers(self, log: str, within: float) -> list[dict]:
        out, now = [], time.time()
        for p in self.folder.glob("*.json"):
            try:
                if now - p.stat().st_mtime > within:
                    continue
                doc = json.loads(p.read_text())
                if doc["log"] == log:
                    out.append({"name": p.stem, "seq": int(doc["seq"]),
                                "folded": int(doc.get("folded", 0))})  # fmt: skip
            except (OSError, ValueError, KeyError):
                continue  # replaced or half-written: read again next round
        return out

    def min_folded(self, log: str) -> int | None:
        seen = self._workers(log, RETAIN_S)
        return min((w["folded"] for w in seen), default=None)

    def publish(self, log: str, seq: int) -> None:
        return None  # the log itself carries it (its size grew)

    def target(self, log: str) -> int:
        return 0

    def wait(self, log: str, timeout: float) -> bool:
        return False  # no announcements: the sync thread sleeps and looks at the log's size

    def close(self) -> None:
        return None

    def lagging(self, log: str, seq: int) -> list[str]:
        return [w["name"] for w in self._workers(log, ALIVE_S) if w["seq"] < seq]


class ItemSync:
    """This worker's side: follow the log, heartbeat, and wait for the others on a write."""

    def __init__(self, served, settings, metrics) -> None:
        self.served = served
        self.settings = settings
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._truncated = 0  # the folded seq this worker has seen the log truncated to
        if settings.redis_url:
            self.registry: Registry | None = RedisRegistry(
                settings.redis_url, settings.redis_prefix, settings.redis_timeout_s
            )
        elif settings.control_dir is not None:
            self.registry = FileRegistry(settings.control_dir)
        else:
            self.registry = None
        self.sync = BackgroundSync(
            "items", self._step, settings.sync_interval_s,
            lambda up: metrics.store_up.labels("items").set(int(up)),
            lambda: metrics.store_errors_total.labels("items").inc(),
        )  # fmt: skip

    def start(self) -> None:
        try:  # once before serving: /readyz reports the item log's real state from the start
            self._sync_once()
        except Exception as exc:  # Redis away: degraded, the thread retries
            self.sync.mark_failed(exc)
        self.sync.start()

    def stop(self) -> None:
        self.sync.stop()
        if self.registry is not None:
            self.registry.close()

    def _sync_once(self):
        """Catch up with the log if it grew or Redis names a newer record; heartbeat."""
        r = self.served.retriever
        cat = r.catalogue if r is not None else None
        if cat is not None:
            log = cat.log.path.name
            target = self.registry.target(log) if self.registry is not None else 0
            if target > cat.seq or cat.log_moved():
                self.served.catch_up()
                cat = self.served.retriever.catalogue
            if self.registry is not None:
                self.registry.heartbeat(log, self.replica, cat.seq, cat.folded)
            self._truncate(cat)
        self.sync.mark_ok()
        return cat

    def _truncate(self, cat) -> None:
        """Drop the log's records this bundle folded in once no replica can need them."""
        if not self.settings.truncate_item_log or cat.folded <= self._truncated:
            return
        if cat.log.base() < cat.folded:
            reg = self.registry
            floor = reg.min_folded(cat.log.path.name) if reg is not None else cat.folded
            if floor is None or floor < cat.folded:
                return  # a replica still serves an older bundle: it may reload and replay it
            done = cat.log.truncate(cat.folded)
            if done is not None:
                log.info("item log %s truncated: %s", cat.log.path, done)
        self._truncated = cat.folded

    def _step(self) -> None:
        cat = self._sync_once()
        interval = self.settings.sync_interval_s
        if cat is not None and isinstance(self.registry, RedisRegistry):
            self.registry.wait(cat.log.path.name, interval)  # an announcement, or the interval
        else:
            self.sync.wait(interval)

    def acknowledge(self, log: str, seq: int) -> None:
        """Publish ``seq`` and wait until every live replica applied it (StoreUnavailableError if
        some have not within ``items_visible_timeout_s``: the write is durable, still on its
        way)."""
        reg = self.registry
        if reg is None:
            return
        timeout = self.settings.items_visible_timeout_s
        try:
            reg.heartbeat(log, self.replica, seq, self.served.retriever.catalogue.folded)
            reg.publish(log, seq)
            end = time.monotonic() + timeout
            while True:
                lag = reg.lagging(log, seq)
                if not lag:
                    return
                if time.monotonic() >= end:
                    break
                time.sleep(0.01)
        except Exception as exc:  # Redis away: we cannot know who saw it
            raise StoreUnavailableError(
                f"item write durable in the item log (record {seq}) but its visibility on the "
                f"other replicas could not be confirmed: {type(exc).__name__}: {exc}"
            ) from None
        raise StoreUnavailableError(
            f"item write durable in the item log (record {seq}) but replicas {sorted(lag)[:5]} "
            f"had not applied it within {timeout} s; they apply it when they catch up"
        )
