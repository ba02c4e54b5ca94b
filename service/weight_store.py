"""Scenario weights: a local cache the request path reads, kept in sync with a shared backend.

Two backends (docs/design.md#the-weight-store-and-its-consistency):

* :class:`RedisWeightStore` (``CSMF_REDIS_URL`` set): a hash of scenario documents (deletes
  leave versioned tombstones), a hash of per-scenario versions, a generation counter bumped by
  every change and announced on a channel, and an epoch id set when the store is initialised.
  Each process keeps a local copy: a background thread listens on the channel and polls epoch and
  generation every ``sync_interval_s`` (a lost message costs at most one interval) and reconciles
  when either changes: it pushes every record it knows (compare-and-set by version, in Lua) and
  takes every newer one. Redis down → the thread marks the store degraded and retries; the local
  copy keeps serving; on reconnect it reconciles, so a Redis that came back *empty* gets every
  scenario any replica knew written back, and a stale re-seed never overwrites a newer write
  (the invariant is spelled out above ``_SYNC`` below and in docs/design.md#redis).
* :class:`FileWeightStore` (embedded): one JSON file, written atomically (tmp + fsync +
  ``os.replace``) under an ``flock`` so the workers of one server never lose a write; every worker
  polls the file's identity, so a write in one worker is seen by the others within an interval.
  It survives restarts.

Weights are stored by objective name; they are validated against the served bundle's cascade by
the routes, which know it. A scenario may also hold experiment arms (``service/experiments.py``):
they travel inside the same versioned document (``"arms": [{"name", "weights", "share"}]``), so
every invariant above holds for them unchanged; ``weights`` is then the first arm's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from csmf.atomic import atomic_write_text
from csmf.errors import CsmfError
from csmf.weights import DEFAULT_OBJECTIVES, DEFAULT_WEIGHTS
from service.errors import ConflictError, StoreUnavailableError, UnknownScenarioError
from service.experiments import Arm
from service.sync import BackgroundSync, Health

log = logging.getLogger("csmf.service")
DEFAULT_SCENARIO = "default"
FILE_FORMAT = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    weights: dict[str, float]
    description: str
    version: int
    updated_at: str
    deleted: bool = False  # a tombstone: keeps a delete ordered against older re-seeds (Redis)
    arms: tuple[Arm, ...] = ()  # experiment arms; empty = one triplet for everyone

    def doc(self) -> dict:
        d = {
            "weights": self.weights,
            "description": self.description,
            "updated_at": self.updated_at,
        }
        if self.arms:
            d["arms"] = [a.doc() for a in self.arms]
        if self.deleted:
            d["deleted"] = True
        return d


def _parse_arms(raw) -> tuple[Arm, ...]:
    return tuple(
        Arm(str(a["name"]), {str(k): float(v) for k, v in a["weights"].items()}, float(a["share"]))
        for a in raw or ()
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_weights(objectives: Sequence[str]) -> dict[str, float]:
    """⟨1, 1.8, 1.2⟩ by name for the paper's cascade (or the part of it this bundle has), and 0
    for an objective added to it later (``csmf extend``: the default scenario then serves what
    it served before, bit for bit, until an operator weights the new objective); 1 for every
    objective of a cascade that has none of the paper's."""
    paper = dict(zip(DEFAULT_OBJECTIVES, DEFAULT_WEIGHTS, strict=True))
    if any(o in paper for o in objectives):
        return {o: paper.get(o, 0.0) for o in objectives}
    return dict.fromkeys(objectives, 1.0)


def default_scenario(objectives: Sequence[str]) -> Scenario:
    return Scenario(
        DEFAULT_SCENARIO,
        default_weights(objectives),
        "the paper's default triplet <k_d, k_o, k_r> = <1, 1.8, 1.2>",
        1,
        now_iso(),
    )


class WeightStore:
    """Local cache + background sync. Subclasses implement the backend."""

    backend = "?"
    corrupt: str | None = None  # embedded store: why its file is unreadable (until rewritten)

    def __init__(
        self,
        objectives: Sequence[str],
        interval: float,
        on_state: Callable[[bool], None] = lambda up: None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        d = default_scenario(objectives)
        # Replaced wholesale, never mutated: request threads read it without a lock.
        self.scenarios: dict[str, Scenario] = {d.name: d}
        self.generation = 0
        self.interval = interval
        self._lock = threading.Lock()
        self._sync = BackgroundSync("weights", self._step, interval, on_state, on_error)

    @property
    def health(self) -> Health:
        return self._sync.health

    def get(self, name: str) -> Scenario:
        s = self.scenarios.get(name)
        if s is None:
            raise UnknownScenarioError(name)
        return s

    def start(self) -> None:
        self._sync.start()

    def stop(self) -> None:
        self._sync.stop()

    def wait_synced(self, timeout: float) -> bool:
        """Block until the first sync succeeded (or ``timeout``); startup uses it so a healthy
        store serves the shared scenarios from the first request."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.health.up:
                return True
            time.sleep(0.01)
        return self.health.up

    def _replace(self, scenarios: dict[str, Scenario], generation: int) -> None:
        if DEFAULT_SCENARIO not in scenarios:  # never serve without the default
            scenarios[DEFAULT_SCENARIO] = self.scenarios[DEFAULT_SCENARIO]
        self.scenarios = scenarios
        self.generation = generation

    # -- backend ----------------------------------------------------------------------------------

    def put(
        self,
        name: str,
        weights: Mapping[str, float],
        description: str,
        arms: Sequence[Arm] = (),
        expected_version: int | None = None,
    ) -> Scenario:
        """Create or replace ``name``. With ``expected_version`` a compare-and-set: the write
        happens only if the scenario is at that version now (0: does not exist), else
        :class:`ConflictError` and nothing is written."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError


def _conflict(name: str, current: int, expected: int) -> ConflictError:
    now = f"is at version {current}" if current else "does not exist"
    was = f"version {expected}" if expected else "absent"
    return ConflictError(
        f"scenario {name!r} {now}, not {was} as the write expected (changed since it was read); "
        "nothing was written: read it again and retry"
    )


def _check_delete(name: str, scenarios: Mapping[str, Scenario]) -> None:
    if name == DEFAULT_SCENARIO:
        raise ConflictError("the 'default' scenario cannot be deleted; PUT new weights instead")
    if name not in scenarios:
        raise UnknownScenarioError(name)


# -- embedded: one JSON file -----------------------------------------------------------------------


class CorruptScenariosFileError(CsmfError, ValueError):
    """The scenarios file exists but is not a complete scenarios document."""


def _parse_file(text: str) -> tuple[dict[str, Scenario], int]:
    raw = json.loads(text)
    if not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"format {got!r}, expected {FILE_FORMAT}")
    out = {}
    for n, d in raw["scenarios"].items():
        weights = {str(k): float(v) for k, v in d["weights"].items()}
        if not all(math.isfinite(v) for v in weights.values()):
            raise ValueError(f"scenario {n!r} has non-finite weights {weights}")
        out[n] = Scenario(
            n,
            weights,
            str(d["description"]),
            int(d["version"]),
            str(d["updated_at"]),
            arms=_parse_arms(d.get("arms")),
        )
    return out, int(raw["generation"])


class FileWeightStore(WeightStore):
    backend = "file"

    def __init__(self, path: Path, objectives: Sequence[str], interval: float, **kw) -> None:
        super().__init__(objectives, interval, **kw)
        self.path = Path(path)
        self._sig: tuple | None = None
        self.corrupt: str | None = None  # why the file could not be read, until it is rewritten

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, Scenario], int] | None:
        """The file's scenarios and generation; None when there is no file yet. A file that is
        not a complete scenarios document (truncated, hand-edited, another format) raises
        CorruptScenariosFileError."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return _parse_file(text)
        except Exception as exc:  # any shape problem: the file is unusable as a whole
            raise CorruptScenariosFileError(
                f"scenarios file {self.path} is corrupt ({type(exc).__name__}: {exc}); serving "
                "the last known scenarios; the next admin write rewrites it and keeps the bad "
                "file beside it as *.corrupt-<time>"
            ) from None

    def _write(self, scenarios: Mapping[str, Scenario], generation: int) -> None:
        doc = {
            "format": FILE_FORMAT,
            "generation": generation,
            "scenarios": {n: s.doc() | {"version": s.version} for n, s in scenarios.items()},
        }
        atomic_write_text(self.path, json.dumps(doc, indent=1))

    def _load(self) -> None:
        """Read the file into the cache; a missing file is (re)created from the cache; a corrupt
        one is reported (degraded, ``corrupt``) and left alone until the next write."""
        with self._lock, self._locked():
            try:
                current = self._read()
            except CorruptScenariosFileError as exc:
                self.corrupt = str(exc)
                raise
            if current is None:
                self._write(self.scenarios, self.generation + 1)
                current = self._read()
            self.corrupt = None
            self._replace(*current)
            self._sig = self._signature()

    def _step(self) -> None:
        if self._signature() != self._sig or self._sig is None or self.corrupt:
            self._load()
        self._sync.mark_ok()
        self._sync.wait(self.interval)

    def _set_aside(self) -> Path:
        """Rename the corrupt file to ``<name>.corrupt-<UTC time>`` so nothing in it is lost."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        os.replace(self.path, aside)
        return aside

    def _mutate(self, fn: Callable[[dict[str, Scenario]], None]) -> None:
        try:
            with self._lock, self._locked():
                try:
                    current = self._read() or (dict(self.scenarios), self.generation)
                except CorruptScenariosFileError as exc:
                    aside = self._set_aside()
                    log.warning("%s; rewriting it from memory, the bad file is %s", exc, aside)
                    current = (dict(self.scenarios), self.generation)
                scenarios, generation = dict(current[0]), current[1]
                fn(scenarios)
                self._write(scenarios, generation + 1)
                self._replace(scenarios, generation + 1)
                self._sig = self._signature()
                self.corrupt = None
        except OSError as exc:
            raise StoreUnavailableError(f"cannot write scenarios file {self.path}: {exc}") from None
        self._sync.mark_ok()

    def put(
        self,
        name: str,
        weights: Mapping[str, float],
        description: str,
        arms: Sequence[Arm] = (),
        expected_version: int | None = None,
    ) -> Scenario:
        out: list[Scenario] = []

        def fn(scenarios: dict[str, Scenario]) -> None:
            old = scenarios.get(name)
            current = old.version if old else 0
            if expected_version is not None and current != expected_version:
                raise _conflict(name, current, expected_version)  # under the lock: nothing written
            version = current + 1
            s = Scenario(name, dict(weights), description, version, now_iso(), arms=tuple(arms))
            scenarios[name] = s
            out.append(s)

        self._mutate(fn)
        return out[0]

    def delete(self, name: str) -> None:
        def fn(scenarios: dict[str, Scenario]) -> None:
            _check_delete(name, scenarios)
            del scenarios[name]

        self._mutate(fn)


# -- shared: Redis ---------------------------------------------------------------------------------
#
# Keys: `scenarios` (name -> JSON document; a delete leaves a tombstone `{"deleted": true, ...}`),
# `scenarios:versions` (name -> version), `scenarios:generation` (bumped by every change, announced
# on `scenarios:changed`) and `scenarios:epoch` (a random id set when the store is initialised:
# an empty Redis has none, so every replica notices that it lost its data).
#
# Invariant (docs/design.md#redis): every record carries a version, and Redis and every
# replica only ever replace a record by one with a *higher* version (compare-and-set in Lua, merge
# by version locally). A write's version is max(stored + 1, writer's known + 1, Redis TIME in ms),
# so a write acknowledged after another one outranks it even if Redis lost the first in between
# and the writer never saw it. Replicas push (re-seed) every record they know whenever the epoch or
# generation changes and on every reconnect; the compare-and-set makes a stale push harmless.

# Compare-and-set every given record, initialise the epoch if missing, announce a change, and return
# the whole store. ARGV: channel, epoch id to use if there is none, then (name, doc, version) triples.
_SYNC = """
local fresh = redis.call('SET', KEYS[4], ARGV[2], 'NX')
local changed = 0
for i = 3, #ARGV, 3 do
  local v = tonumber(ARGV[i + 2])
  if v > tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0') then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    changed = changed + 1
  end
end
if changed > 0 or fresh then
  redis.call('PUBLISH', ARGV[1], redis.call('INCR', KEYS[3]))
end
return {redis.call('GET', KEYS[4]), redis.call('GET', KEYS[3]) or '0',
        redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""

# One put or delete. ARGV: channel, epoch id to use if there is none, name, doc, the writer's known
# version of the name, op ('put' | 'delete'), '1' if the writer sees the name live, the version a
# compare-and-set put expects ('' = unconditional; 0 = absent or deleted). A delete of a name live
# neither in Redis nor (at a newer version) at the writer returns 'unknown'; a put whose expected
# version is not the live one in Redis returns 'conflict' with the live one.
_WRITE = """
local fresh = redis.call('SET', KEYS[4], ARGV[2], 'NX')
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
local known = tonumber(ARGV[5])
if ARGV[8] ~= '' then
  local doc = redis.call('HGET', KEYS[1], ARGV[3])
  local ok, d = pcall(cjson.decode, doc or 'null')
  local live = doc and not (ok and type(d) == 'table' and d.deleted)
  local have = 0
  if live then have = cur end
  if have ~= tonumber(ARGV[8]) then
    if fresh then redis.call('PUBLISH', ARGV[1], redis.call('INCR', KEYS[3])) end
    return {'conflict', string.format('%.0f', have), redis.call('GET', KEYS[4])}
  end
end
if ARGV[6] == 'delete' then
  local doc = redis.call('HGET', KEYS[1], ARGV[3])
  local ok, d = pcall(cjson.decode, doc or 'null')
  local live = doc and not (ok and type(d) == 'table' and d.deleted)
  if not live and not (ARGV[7] == '1' and known > cur) then
    if fresh then redis.call('PUBLISH', ARGV[1], redis.call('INCR', KEYS[3])) end
    return {'unknown', '0', redis.call('GET', KEYS[4])}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = string.format('%.0f', math.max(cur + 1, known + 1, now))
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], v)
redis.call('PUBLISH', ARGV[1], redis.call('INCR', KEYS[3]))
return {'ok', v, redis.call('GET', KEYS[4])}
"""
RECONCILE_EVERY_S = 30.0  # a full reconcile even without a visible change (belt and braces)


def redis_client(url: str, timeout: float):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No client-side retries: the sync loop owns reconnecting, and an admin write should fail
    # fast (503) rather than hang while Redis is away.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _parse_records(docs: Mapping[str, str], versions: Mapping[str, str]) -> dict[str, Scenario]:
    """Redis documents → records (tombstones included). A document this code cannot read (written
    by hand, or by a future format) is skipped with a warning, not fatal to the whole sync."""
    out = {}
    for name, raw in docs.items():
        try:
            d = json.loads(raw)
            out[name] = Scenario(
                name,
                {str(k): float(v) for k, v in (d.get("weights") or {}).items()},
                str(d.get("description", "")),
                int(versions.get(name, 1)),
                str(d.get("updated_at", "")),
                bool(d.get("deleted", False)),
                _parse_arms(d.get("arms")),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable scenario %r in Redis: %s: %s", name, raw[:200], exc)
    return out


class RedisWeightStore(WeightStore):
    backend = "redis"

    def __init__(
        self,
        url: str,
        prefix: str,
        objectives: Sequence[str],
        interval: float,
        timeout: float,
        **kw,
    ):
        super().__init__(objectives, interval, **kw)
        self.client = redis_client(url, timeout)
        self.k_docs = f"{prefix}scenarios"
        self.k_versions = f"{prefix}scenarios:versions"
        self.k_generation = f"{prefix}scenarios:generation"
        self.k_epoch = f"{prefix}scenarios:epoch"
        self.channel = f"{prefix}scenarios:changed"
        self._keys = [self.k_docs, self.k_versions, self.k_generation, self.k_epoch]
        self._sync_script = self.client.register_script(_SYNC)
        self._write_script = self.client.register_script(_WRITE)
        # Every record this replica knows, tombstones included; `scenarios` is its live view.
        self.known: dict[str, Scenario] = dict(self.scenarios)
        self.epoch: str | None = None
        self._last_reconcile = 0.0
        self._pubsub = None

    def _merge(self, incoming: Mapping[str, Scenario]) -> None:
        """Take every incoming record newer than the one known; never go back. Caller holds
        the lock."""
        known = dict(self.known)
        changed = False
        for name, s in incoming.items():
            cur = known.get(name)
            if cur is None or s.version > cur.version:
                known[name] = s
                changed = True
        if changed:
            self.known = known
            live = {n: s for n, s in known.items() if not s.deleted}
            self._replace(live, self.generation)

    def _reconcile(self) -> None:
        """Push every known record (compare-and-set: only where newer than Redis's), then take
        every record Redis has that is newer than ours. Initialises the epoch of an empty Redis."""
        with self._lock:
            args = [self.channel, uuid.uuid4().hex]
            for s in self.known.values():
                args += [s.name, json.dumps(s.doc()), s.version]
            epoch, gen, docs, versions = self._sync_script(keys=self._keys, args=args)
            self._merge(_parse_records(_pairs(docs), _pairs(versions)))
            if self.epoch is not None and epoch != self.epoch:
                log.warning(
                    "weight store: new Redis epoch %s (was %s: Redis lost or replaced its data); "
                    "re-seeded the %d scenario record(s) this replica knew",
                    epoch, self.epoch, len(self.known),
                )  # fmt: skip
            self.epoch, self.generation = epoch, int(gen)
            self._last_reconcile = time.monotonic()

    def _connect(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        self._pubsub = pubsub  # subscribed before the full read: no change can fall in between
        self._reconcile()

    def _close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None

    def _step(self) -> None:
        try:
            if self._pubsub is None:
                self._connect()
                self._sync.mark_ok()
            self._pubsub.get_message(timeout=self.interval)  # returns early on a change
            while self._pubsub.get_message(timeout=0.0) is not None:
                pass
            epoch, gen = self.client.mget(self.k_epoch, self.k_generation)
            if (
                epoch != self.epoch
                or int(gen or 0) != self.generation
                or time.monotonic() - self._last_reconcile > RECONCILE_EVERY_S
            ):
                self._reconcile()
            self._sync.mark_ok()
        except Exception:
            self._close()
            raise

    def stop(self) -> None:
        super().stop()
        self._close()
        with contextlib.suppress(Exception):
            self.client.close()

    def _write(
        self, name: str, record: Scenario, what: str, expected_version: int | None = None
    ) -> Scenario:
        import redis

        op = "delete" if record.deleted else "put"
        cur = self.known.get(name)
        args = [self.channel, uuid.uuid4().hex, name, json.dumps(record.doc())]
        args += [cur.version if cur else 0, op, int(name in self.scenarios)]
        args += ["" if expected_version is None else expected_version]
        try:
            status, version, epoch = self._write_script(keys=self._keys, args=args)
        except redis.RedisError as exc:
            raise StoreUnavailableError(
                f"weight store (Redis) unavailable, cannot {what}: {type(exc).__name__}: {exc}; "
                "requests keep using the last known scenarios"
            ) from None
        if status == "unknown":
            raise UnknownScenarioError(name)
        if status == "conflict":
            raise _conflict(name, int(version), expected_version)
        out = dataclasses.replace(record, version=int(version))
        with self._lock:  # read-your-writes in this replica, whatever Redis does next
            self._merge({name: out})
        if epoch != self.epoch:
            # Redis was initialised since this replica last synced (this write may have been the
            # first): re-seed what this replica knows now rather than at the next poll. The write
            # itself is acknowledged either way; a failure here is the sync thread's to retry.
            with contextlib.suppress(Exception):
                self._reconcile()
        return out

    def put(
        self,
        name: str,
        weights: Mapping[str, float],
        description: str,
        arms: Sequence[Arm] = (),
        expected_version: int | None = None,
    ) -> Scenario:
        s = Scenario(name, dict(weights), description, 0, now_iso(), arms=tuple(arms))
        return self._write(name, s, f"write scenario {name!r}", expected_version)

    def delete(self, name: str) -> None:
        if name == DEFAULT_SCENARIO:
            _check_delete(name, self.scenarios)
        self._write(name, Scenario(name, {}, "", 0, now_iso(), deleted=True), f"delete {name!r}")
