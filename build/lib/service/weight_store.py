"""Scenario weights: a local cache the request path reads, kept in sync with a shared backend.

Two backends (DESIGN §5):

* :class:`RedisWeightStore` (``CSMF_REDIS_URL`` set): a hash of scenario documents, a hash of
  per-scenario versions and a generation counter bumped by every write, which is also published
  on a channel. Each process keeps a local copy: a background thread listens on the channel and
  polls the generation every ``sync_interval_s`` (so a lost message costs at most one interval),
  reloading everything when it changes. Redis down → the thread marks the store degraded and
  retries; the local copy keeps serving; on reconnect it reloads (catches up). If Redis comes back
  *empty* (restarted without persistence), the last known scenarios are written back.
* :class:`FileWeightStore` (embedded): one JSON file, written atomically (tmp + fsync +
  ``os.replace``) under an ``flock`` so the workers of one server never lose a write; every worker
  polls the file's identity, so a write in one worker is seen by the others within an interval.
  It survives restarts.

Weights are stored by objective name; they are validated against the served bundle's cascade by
the routes, which know it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from csmf.weights import DEFAULT_OBJECTIVES, DEFAULT_WEIGHTS
from service.errors import ConflictError, StoreUnavailableError, UnknownScenarioError
from service.sync import BackgroundSync, Health

DEFAULT_SCENARIO = "default"
FILE_FORMAT = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    weights: dict[str, float]
    description: str
    version: int
    updated_at: str

    def doc(self) -> dict:
        return {
            "weights": self.weights,
            "description": self.description,
            "updated_at": self.updated_at,
        }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_weights(objectives: Sequence[str]) -> dict[str, float]:
    """⟨1, 1.8, 1.2⟩ by name for the paper's cascade (or the part of it this bundle has),
    otherwise 1 for every objective."""
    paper = dict(zip(DEFAULT_OBJECTIVES, DEFAULT_WEIGHTS, strict=True))
    if all(o in paper for o in objectives):
        return {o: paper[o] for o in objectives}
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
            raise UnknownScenarioError(name, list(self.scenarios))
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

    def put(self, name: str, weights: Mapping[str, float], description: str) -> Scenario:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError


def _check_delete(name: str, scenarios: Mapping[str, Scenario]) -> None:
    if name == DEFAULT_SCENARIO:
        raise ConflictError("the 'default' scenario cannot be deleted; PUT new weights instead")
    if name not in scenarios:
        raise UnknownScenarioError(name, list(scenarios))


# -- embedded: one JSON file -----------------------------------------------------------------------


class FileWeightStore(WeightStore):
    backend = "file"

    def __init__(self, path: Path, objectives: Sequence[str], interval: float, **kw) -> None:
        super().__init__(objectives, interval, **kw)
        self.path = Path(path)
        self._sig: tuple | None = None

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
        """The file's scenarios and generation; None when there is no file yet."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        if raw.get("format") != FILE_FORMAT:
            raise ValueError(f"{self.path}: format {raw.get('format')!r}, expected {FILE_FORMAT}")
        out = {n: Scenario(name=n, **d) for n, d in raw["scenarios"].items()}
        return out, int(raw["generation"])

    def _write(self, scenarios: Mapping[str, Scenario], generation: int) -> None:
        doc = {
            "format": FILE_FORMAT,
            "generation": generation,
            "scenarios": {
                n: {k: v for k, v in asdict(s).items() if k != "name"} for n, s in scenarios.items()
            },
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self) -> None:
        """Read the file into the cache; a missing file is (re)created from the cache."""
        with self._lock, self._locked():
            current = self._read()
            if current is None:
                self._write(self.scenarios, self.generation + 1)
                current = self._read()
            self._replace(*current)
            self._sig = self._signature()

    def _step(self) -> None:
        if self._signature() != self._sig or self._sig is None:
            self._load()
        self._sync.mark_ok()
        self._sync.wait(self.interval)

    def _mutate(self, fn: Callable[[dict[str, Scenario]], None]) -> None:
        try:
            with self._lock, self._locked():
                current = self._read() or (dict(self.scenarios), self.generation)
                scenarios, generation = dict(current[0]), current[1]
                fn(scenarios)
                self._write(scenarios, generation + 1)
                self._replace(scenarios, generation + 1)
                self._sig = self._signature()
        except OSError as exc:
            raise StoreUnavailableError(f"cannot write scenarios file {self.path}: {exc}") from None

    def put(self, name: str, weights: Mapping[str, float], description: str) -> Scenario:
        out: list[Scenario] = []

        def fn(scenarios: dict[str, Scenario]) -> None:
            old = scenarios.get(name)
            s = Scenario(
                name, dict(weights), description, (old.version if old else 0) + 1, now_iso()
            )
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

# Writes the given scenarios that are missing (all of them when the generation key is missing, i.e.
# Redis is new or lost its data; otherwise only the default), then bumps and announces the
# generation if anything was written. ARGV: channel, then (name, doc, version) triples.
_SEED = """
local fresh = redis.call('EXISTS', KEYS[3]) == 0
local changed = false
for i = 2, #ARGV, 3 do
  local name = ARGV[i]
  if (fresh or name == 'default') and redis.call('HSETNX', KEYS[1], name, ARGV[i + 1]) == 1 then
    redis.call('HSETNX', KEYS[2], name, ARGV[i + 2])
    changed = true
  end
end
if changed or fresh then
  local g = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[1], g)
end
return 0
"""


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
        self.channel = f"{prefix}scenarios:changed"
        self._seed = self.client.register_script(_SEED)
        self._pubsub = None

    def _full_sync(self) -> None:
        with self._lock:
            with self.client.pipeline(transaction=True) as p:
                p.get(self.k_generation)
                p.hgetall(self.k_docs)
                p.hgetall(self.k_versions)
                gen, docs, versions = p.execute()
            scenarios = {}
            for name, raw in docs.items():
                d = json.loads(raw)
                scenarios[name] = Scenario(
                    name,
                    d["weights"],
                    d.get("description", ""),
                    int(versions.get(name, 1)),
                    d["updated_at"],
                )
            self._replace(scenarios, int(gen or 0))

    def _connect(self) -> None:
        args = [self.channel]
        for s in self.scenarios.values():
            args += [s.name, json.dumps(s.doc()), s.version]
        self._seed(keys=[self.k_docs, self.k_versions, self.k_generation], args=args)
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        self._pubsub = pubsub  # subscribed before the full read: no change can fall in between
        self._full_sync()

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
            gen = self.client.get(self.k_generation)
            if gen is None or int(gen) != self.generation:
                if gen is None:  # Redis lost its data: write back what we know
                    self._close()
                    return
                self._full_sync()
            self._sync.mark_ok()
        except Exception:
            self._close()
            raise

    def stop(self) -> None:
        super().stop()
        self._close()
        with contextlib.suppress(Exception):
            self.client.close()

    def _write(self, fn: Callable, what: str):
        import redis

        try:
            with self.client.pipeline(transaction=True) as p:
                out = fn(p)
            self._full_sync()  # read-your-writes in this process
            return out
        except redis.RedisError as exc:
            raise StoreUnavailableError(
                f"weight store (Redis) unavailable, cannot {what}: {type(exc).__name__}: {exc}; "
                "requests keep using the last known scenarios"
            ) from None

    def put(self, name: str, weights: Mapping[str, float], description: str) -> Scenario:
        updated = now_iso()
        doc = json.dumps(
            {"weights": dict(weights), "description": description, "updated_at": updated}
        )

        def fn(p):
            p.hset(self.k_docs, name, doc)
            p.hincrby(self.k_versions, name, 1)
            p.incr(self.k_generation)
            p.publish(self.channel, "put")
            return p.execute()[1]

        version = self._write(fn, f"write scenario {name!r}")
        return Scenario(name, dict(weights), description, int(version), updated)

    def delete(self, name: str) -> None:
        _check_delete(name, self.scenarios)

        def fn(p):
            p.hdel(self.k_docs, name)
            p.incr(self.k_generation)
            p.publish(self.channel, "delete")
            return p.execute()[0]

        if not self._write(fn, f"delete scenario {name!r}"):
            raise UnknownScenarioError(name, list(self.scenarios))
