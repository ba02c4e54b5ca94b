"""Milvus backend through pymilvus' MilvusClient (the optional ``milvus`` extra).

One URI serves development and production: a file path (``bundles/items.db``) is Milvus Lite, a
local embedded engine (brute force, one process at a time: for development and tests);
``http://host:19530`` is Milvus Standalone or Distributed (deploy/docker-compose.yml).

Collection per bundle build: ``<alias>__<UTC time>_<random>`` with the fields ``row`` (INT64
primary key = the row in the bundle's item table), ``vector`` (FLOAT_VECTOR, inner product) and
one nullable scalar field per filterable attribute. The bundle pins that versioned collection, so
its rows always match its item table; after the bundle is published the builder moves the alias
(``promote``) to it — one atomic switch for anyone reading the alias — and drops every other
version but the previous one (a replica still serving the previous bundle keeps working).

CSMF's weighting is a scale of the query, so a weighted search is ONE Milvus search of
``c ⊙ e`` — exact on FLAT — not a WeightedRanker merge of per-objective searches. Filters and
exclusions become one boolean expression (``csmf.index.filters.to_expr`` and ``row not in``);
Milvus plans selective filters itself.

Item writes are native: ``upsert`` / ``delete`` by primary key (``row``), attributes included so
expression filters keep working for written items. Searches run at Session consistency: a
client reads its own writes (after a write, the next search waits until the engine has applied
it; otherwise it costs nothing), other clients see them once the engine has applied them.
Milvus 2.3 answers a delete without the timestamp Session waits on, so after a delete to a
server the searches run Strong (~200 ms more) until one has completed. Milvus 2.3
(the embedded server of csmf/index/milvus_server.py) has no nullable fields: a collection built
there stores a placeholder and a ``<field>__null`` flag per attribute, and filters are guarded
by the flags (``to_expr(null_flags=...)``) so a null still never matches.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as NoAnswer
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from csmf.errors import BundleError, ConfigError, IndexUnavailableError, ItemWriteError
from csmf.index.base import Capabilities, IndexSpec, VectorIndex, Where, check_write
from csmf.index.filters import NULL_FLAG, to_expr
from csmf.progress import progress_bar

try:
    from pymilvus import DataType, MilvusClient
    from pymilvus.exceptions import MilvusException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise BundleError(
        "the Milvus backend needs pymilvus (and milvus-lite for file URIs): "
        "pip install 'csmf-retrieval[milvus]'"
    ) from exc

MILVUS_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
KNOBS = {"IVF_FLAT": "nprobe", "HNSW": "ef"}
INSERT_BATCH = 5000
MAX_VARCHAR = 65535
# A search the engine cannot answer in time is a 503, not a hung request: 5 s, plus 20 ms per
# query of a batch (the builder's recall check sends hundreds at once)
SEARCH_TIMEOUT_S = 5.0
SEARCH_TIMEOUT_PER_QUERY_S = 0.02
CONSISTENCY = "Session"  # read your own writes; see the module doc
HEALTH_TTL_S = 1.0  # /readyz probes the engine at most once a second
PLACEHOLDER = {"VARCHAR": "", "DOUBLE": 0.0, "BOOL": False}  # stored for null with null flags
# Reads run on these threads so that a request waits at most its deadline (see _within)
_READS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="milvus-read")


def _within(seconds: float, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, or TimeoutError once ``seconds`` have passed. pymilvus retries
    a failing call until its own ``timeout`` has passed and then lets the last attempt run a
    whole ``timeout`` more, after a back-off sleep: against a server that is restarting (it
    accepts connections, answers nothing) a read could take twice its timeout and more. The
    call itself runs on until pymilvus gives up; the request does not wait for it."""
    pending = _READS.submit(call, *args, **kwargs)
    try:
        return pending.result(timeout=seconds)
    except NoAnswer:
        pending.cancel()  # drops it if still queued (every thread busy); a running call runs on
        raise TimeoutError(f"no answer within {seconds:g} s") from None


@dataclass(frozen=True)
class MilvusSpec:
    """How to build a Milvus collection (index_builder.config.BuildConfig makes one)."""

    uri: str
    alias: str = "csmf_items"
    kind: str = "flat"  # flat | ivf | hnsw
    build_params: dict[str, Any] = field(default_factory=dict)  # nlist / M, efConstruction
    search_params: dict[str, Any] = field(default_factory=dict)  # nprobe / ef
    token: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in MILVUS_TYPES:
            raise ConfigError(
                f"Milvus index must be one of {tuple(MILVUS_TYPES)}, got {self.kind!r}"
            )
        if not self.alias.isidentifier():
            raise ConfigError(f"Milvus collection alias must be an identifier, got {self.alias!r}")


_LITE_USERS: dict[str, int] = {}  # Milvus Lite file → open clients in this process
_LITE_LOCK = threading.Lock()


def connect(uri: str, token: str | None = None) -> MilvusClient:
    """A client for ``uri``: a Milvus Lite file (``*.db``; its folder is created) or a server
    URL. Close it with :func:`disconnect`, which stops this process' Lite server for the file
    (and frees its lock) once the last client of the file is gone."""
    lite = "://" not in uri
    if lite:
        if not uri.endswith(".db"):
            raise BundleError(f"a Milvus Lite URI is a file path ending in .db, got {uri!r}")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MilvusClient(uri=uri, token=token or "")
    except Exception as exc:  # connection refused, locked Lite file, bad URL
        hint = ""
        if lite:
            hint = (
                " (Milvus Lite serves one process at a time: serve it with --workers 1 and stop "
                "other users of the file, or use Milvus Standalone for several workers)"
            )
        raise BundleError(f"cannot connect to Milvus at {uri}: {_first_line(exc)}{hint}") from None
    if lite:
        with _LITE_LOCK:
            key = os.path.abspath(uri)
            _LITE_USERS[key] = _LITE_USERS.get(key, 0) + 1
    return client


def disconnect(client: MilvusClient, uri: str) -> None:
    client.close()
    if "://" in uri:
        return
    key = os.path.abspath(uri)
    with _LITE_LOCK:
        left = _LITE_USERS.get(key, 1) - 1
        if left > 0:
            _LITE_USERS[key] = left
            return
        _LITE_USERS.pop(key, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(key)


class MilvusIndex(VectorIndex):
    def __init__(
        self,
        client: MilvusClient,
        uri: str,
        alias: str,
        collection: str,
        kind: str,
        dim: int,
        n: int,
        build_params: dict[str, Any],
        search_params: dict[str, Any],
        fields: dict[str, str] | None = None,
        null_flags: bool = False,
    ) -> None:
        self.client = client
        self.uri = uri
        self.alias = alias
        self.collection = collection  # the versioned collection this index searches (pinned)
        self.kind = kind
        self.dim = dim
        self.n = n
        self.build_params = dict(build_params)
        self.capabilities = Capabilities(
            "milvus", MILVUS_TYPES[kind], kind == "flat", True, False, writes="native"
        )
        self.build_info: dict[str, Any] = {}
        self.fields = dict(fields or {})  # attribute → Milvus type (VARCHAR / DOUBLE / BOOL)
        self.null_flags = null_flags  # nulls as placeholder + <field>__null (Milvus < 2.5)
        self._flagged = frozenset(self.fields) if null_flags else frozenset()
        self._deleted: set[int] = set()
        # Milvus 2.3 acknowledges a delete without the timestamp Session consistency waits on:
        # after a delete, searches run Strong until one of them has (a "fence")
        self._fence = self._fenced = 0
        self._write_lock = threading.Lock()
        self._health: tuple[float, str | None] = (-1.0, None)
        self.set_search_params(search_params)

    def __len__(self) -> int:
        return self.n

    # -- build ------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, vectors: np.ndarray, attributes: pa.Table, spec: MilvusSpec, progress: bool = True
    ) -> MilvusIndex:
        """Create a new versioned collection holding (row, vector, attributes) and index it.
        The alias is moved by :func:`promote` once the bundle that pins it is published."""
        t0 = time.perf_counter()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        client = connect(spec.uri, spec.token)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
        name = f"{spec.alias}__{stamp}_{secrets.token_hex(3)}"
        null_flags = not _has_nullable_fields(client, spec.uri)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=d)
        columns, fields = {}, {}
        for f in attributes.schema:
            col = attributes.column(f.name)
            if pa.types.is_string(f.type):
                fields[f.name] = "VARCHAR"
            elif pa.types.is_boolean(f.type):
                fields[f.name] = "BOOL"
            else:
                fields[f.name] = "DOUBLE"
            kind = getattr(DataType, fields[f.name])
            extra = {"max_length": MAX_VARCHAR} if fields[f.name] == "VARCHAR" else {}
            if null_flags:
                schema.add_field(f.name, kind, **extra)
                schema.add_field(f.name + NULL_FLAG, DataType.BOOL)
            else:
                schema.add_field(f.name, kind, nullable=True, **extra)
            columns[f.name] = col.to_pylist()
        build = _index_params(spec.kind, n, spec.build_params)
        ip = client.prepare_index_params()
        ip.add_index(
            field_name="vector", index_type=MILVUS_TYPES[spec.kind], metric_type="IP", params=build
        )
        try:
            client.create_collection(name, schema=schema, index_params=ip)
            with progress_bar(n, "insert into milvus", "item", progress) as bar:
                for s in range(0, n, INSERT_BATCH):
                    e = min(n, s + INSERT_BATCH)
                    batch = {c: v[s:e] for c, v in columns.items()}
                    client.insert(name, _entities(range(s, e), x[s:e], batch, fields, null_flags))
                    bar.update(e - s)
            client.flush(name)
            if "://" in spec.uri and spec.kind != "flat":
                _wait_indexed(client, name, progress)
            client.load_collection(name)
        except MilvusException as exc:
            _drop_quietly(client, name)
            disconnect(client, spec.uri)
            raise BundleError(f"Milvus build of {name} at {spec.uri} failed: {exc}") from None
        params = {**_default_search(spec.kind, build), **spec.search_params}
        out = cls(
            client, spec.uri, spec.alias, name, spec.kind, d, n, build, params, fields, null_flags
        )
        out.build_info = {"build_seconds": round(time.perf_counter() - t0, 3)}
        return out

    @classmethod
    def connect(cls, spec: IndexSpec, uri: str | None = None) -> MilvusIndex:
        """The pinned collection of a bundle's index section, at ``uri`` (default: spec.uri)."""
        uri = uri or spec.uri
        if not uri or not spec.collection_version:
            raise BundleError("manifest index section of a milvus bundle lacks uri/collection")
        kind = {v: k for k, v in MILVUS_TYPES.items()}.get(spec.type)
        if kind is None:
            raise BundleError(
                f"manifest index.type must be one of {list(MILVUS_TYPES.values())} for milvus, "
                f"got {spec.type!r}"
            )
        client = connect(uri)
        name = spec.collection_version
        try:
            if not client.has_collection(name):
                raise BundleError(
                    f"Milvus at {uri} has no collection {name!r} (this bundle's version); "
                    "rebuild the bundle or point CSMF_INDEX_URI at the engine it was built into"
                )
            client.load_collection(name)
            info = client.describe_collection(name)
            # the bundle's row count (the caller replays later writes); deletes are not
            # subtracted from the engine's row_count until a compaction
            n = spec.items or int(client.get_collection_stats(name)["row_count"])
        except MilvusException as exc:
            disconnect(client, uri)
            raise BundleError(f"cannot open Milvus collection {name!r} at {uri}: {exc}") from None
        except BundleError:
            disconnect(client, uri)
            raise
        dim = next(int(f["params"]["dim"]) for f in info["fields"] if f["name"] == "vector")
        names = {f["name"] for f in info["fields"]}
        fields = {
            f["name"]: _TYPE_NAMES.get(f["type"], "DOUBLE")
            for f in info["fields"]
            if f["name"] not in ("row", "vector") and not f["name"].endswith(NULL_FLAG)
        }
        null_flags = any(f + NULL_FLAG in names for f in fields)
        alias = spec.collection or name
        return cls(
            client, uri, alias, name, kind, dim, n, spec.build_params, spec.search_params,
            fields, null_flags,
        )  # fmt: skip

    # -- search -----------------------------------------------------------------------------------

    @property
    def search_params(self) -> dict[str, Any]:
        return dict(self._params)

    def set_search_params(self, params: dict[str, Any]) -> None:
        self._params = {k: int(v) for k, v in params.items()}
        self._search = {"metric_type": "IP", "params": dict(self._params)}

    def knob(self) -> tuple[str, int] | None:
        name = KNOBS.get(MILVUS_TYPES[self.kind])
        if name is None:
            return None
        return name, int(self.build_params.get("nlist", 4096)) if name == "nprobe" else 4096

    def search(
        self, queries: np.ndarray, k: int, where: Where | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # (b, D)
        expr = _expression(where, self._flagged)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        if k == 0 or (where is not None and where.allowed is not None and where.allowed.count == 0):
            return scores, rows
        fence = self._fence
        level = CONSISTENCY if fence == self._fenced else "Strong"
        deadline = SEARCH_TIMEOUT_S + SEARCH_TIMEOUT_PER_QUERY_S * len(q)
        try:
            res = _within(
                deadline,
                self.client.search,
                self.collection,
                data=list(q),
                limit=min(k, self.n),
                filter=expr,
                output_fields=["row"],
                search_params=self._search,
                consistency_level=level,
                timeout=deadline,
            )
        except Exception as exc:  # MilvusException, or gRPC's own errors when it is away
            self._health = (time.monotonic(), _first_line(exc))
            raise IndexUnavailableError(
                f"Milvus at {self.uri} cannot answer a search on {self.collection}: "
                f"{_first_line(exc)}"
            ) from None
        if fence != self._fenced:
            self._fenced = max(self._fenced, fence)
        for i, hits in enumerate(res):
            ids = hits.ids
            m = len(ids)
            rows[i, :m] = ids
            scores[i, :m] = hits.distances
        return scores, rows

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), np.float32)
        try:
            got = _within(
                SEARCH_TIMEOUT_S,
                self.client.query,
                self.collection,
                ids=np.unique(rows).tolist(),
                output_fields=["vector"],
                consistency_level=CONSISTENCY,
                timeout=SEARCH_TIMEOUT_S,
            )
        except Exception as exc:
            raise IndexUnavailableError(
                f"Milvus at {self.uri} cannot read vectors of {self.collection}: {_first_line(exc)}"
            ) from None
        by_row = {int(g["row"]): g["vector"] for g in got}
        missing = [int(r) for r in rows if int(r) not in by_row]
        if missing:
            raise BundleError(f"row {missing[0]} is not in Milvus collection {self.collection}")
        return np.asarray([by_row[int(r)] for r in rows], dtype=np.float32)

    # -- item writes ------------------------------------------------------------------------------

    def upsert(
        self,
        rows: np.ndarray,
        vectors: np.ndarray,
        attributes: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Native upsert by primary key, attributes included (see VectorIndex.upsert). A
        column the collection lacks is an error; a column not given keeps an existing row's
        stored value (read back first) and is null for a new row."""
        with self._write_lock:
            r, v = check_write(self.n, self.dim, rows, vectors)
            if r.size == 0:
                return
            attributes = dict(attributes or {})
            unknown = sorted(set(attributes) - set(self.fields))
            if unknown:
                raise ItemWriteError(
                    f"unknown attribute column {unknown[0]!r}: the collection has "
                    f"{sorted(self.fields)}"
                )
            columns = {}
            for name, kind in self.fields.items():
                if name in attributes:
                    col = np.asarray(attributes[name], dtype=object)
                    if col.shape != (r.size,):
                        raise ItemWriteError(
                            f"attribute {name!r} must have one value per row ({r.size}), "
                            f"got shape {col.shape}"
                        )
                    columns[name] = [
                        _value(x, kind, name, int(row)) for x, row in zip(col, r, strict=True)
                    ]
            missing = [f for f in self.fields if f not in columns]
            if missing:
                stored = self._stored(r[r < self.n], missing)
                for name in missing:
                    columns[name] = [stored.get(int(row), {}).get(name) for row in r]
            entities = _entities(r.tolist(), v, columns, self.fields, self.null_flags)
            try:
                for s in range(0, len(entities), INSERT_BATCH):
                    self.client.upsert(
                        self.collection, entities[s : s + INSERT_BATCH], timeout=SEARCH_TIMEOUT_S
                    )
            except Exception as exc:
                raise IndexUnavailableError(
                    f"Milvus at {self.uri} did not take the upsert of {r.size} rows into "
                    f"{self.collection}: {_first_line(exc)}"
                ) from None
            self.n = max(self.n, int(r.max()) + 1)
            self._deleted.difference_update(r.tolist())

    def delete(self, rows: np.ndarray) -> None:
        with self._write_lock:
            r, _ = check_write(self.n, self.dim, rows)
            if r.size == 0:
                return
            try:
                self.client.delete(self.collection, ids=r.tolist(), timeout=SEARCH_TIMEOUT_S)
            except Exception as exc:
                raise IndexUnavailableError(
                    f"Milvus at {self.uri} did not take the delete of {r.size} rows from "
                    f"{self.collection}: {_first_line(exc)}"
                ) from None
            self._deleted.update(r.tolist())
            if "://" in self.uri:
                self._fence += 1

    def deleted_rows(self) -> np.ndarray:
        """Rows deleted through this client since it connected (the engine keeps the rest)."""
        return np.asarray(sorted(self._deleted), np.int64)

    def _stored(self, rows: np.ndarray, names: list[str]) -> dict[int, dict[str, Any]]:
        if rows.size == 0:
            return {}
        out = [*names, *(f + NULL_FLAG for f in names if self.null_flags)]
        try:
            got = _within(
                SEARCH_TIMEOUT_S,
                self.client.query,
                self.collection,
                ids=rows.tolist(),
                output_fields=out,
                consistency_level=CONSISTENCY,
                timeout=SEARCH_TIMEOUT_S,
            )
        except Exception as exc:
            raise IndexUnavailableError(
                f"Milvus at {self.uri} cannot read the stored attributes of {rows.size} rows of "
                f"{self.collection}: {_first_line(exc)}"
            ) from None
        result = {}
        for g in got:
            vals = {}
            for f in names:
                null = g.get(f + NULL_FLAG, False) if self.null_flags else g.get(f) is None
                vals[f] = None if null else g.get(f)
            result[int(g["row"])] = vals
        return result

    # -- health -----------------------------------------------------------------------------------

    def health(self) -> str | None:
        """None while the engine answers a search (probed at most once a second), else why not."""
        now = time.monotonic()
        at, error = self._health
        if now - at < HEALTH_TTL_S:
            return error
        try:
            _within(
                SEARCH_TIMEOUT_S,
                self.client.search,
                self.collection,
                data=[np.zeros(self.dim, np.float32)],
                limit=1,
                search_params=self._search,
                timeout=SEARCH_TIMEOUT_S,
            )
            error = None
        except Exception as exc:
            error = f"Milvus at {self.uri}: {_first_line(exc)}"
        self._health = (time.monotonic(), error)
        return error

    # -- persistence ------------------------------------------------------------------------------

    def save(self, folder: Path) -> dict[str, Any]:
        return {
            "backend": "milvus",
            "type": MILVUS_TYPES[self.kind],
            "build_params": self.build_params,
            "search_params": self.search_params,
            "uri": self.uri,
            "collection": self.alias,
            "collection_version": self.collection,
            "files": [],
            **self.build_info,
            **self.stats(),
        }

    def stats(self) -> dict[str, Any]:
        return {"items": self.n}

    def discard(self) -> None:
        if self.client is not None:
            _drop_quietly(self.client, self.collection)
        self.close()

    def close(self) -> None:
        if self.client is not None:
            disconnect(self.client, self.uri)
            self.client = None


def promote(spec: IndexSpec) -> None:
    """Point ``spec.collection`` (the alias) at ``spec.collection_version``, atomically, and drop
    this alias' other versions except the one it pointed at until now (a replica may still serve
    the previous bundle; builds that never got published leave nothing behind)."""
    client = connect(spec.uri)
    alias, name = spec.collection, spec.collection_version
    try:
        previous = _alias_target(client, alias)
        if previous is None:
            client.create_alias(name, alias)
        elif previous != name:
            client.alter_alias(name, alias)
        for old in client.list_collections():
            if old.startswith(f"{alias}__") and old not in (name, previous):
                client.drop_collection(old)
    except MilvusException as exc:
        raise BundleError(f"cannot move Milvus alias {alias!r} to {name!r}: {exc}") from None
    finally:
        disconnect(client, spec.uri)


def alias_target(uri: str, alias: str) -> str | None:
    """The collection ``alias`` points at, or None."""
    client = connect(uri)
    try:
        return _alias_target(client, alias)
    finally:
        disconnect(client, uri)


def _alias_target(client: MilvusClient, alias: str) -> str | None:
    try:
        return client.describe_alias(alias)["collection_name"]
    except MilvusException:
        return None


def _expression(where: Where | None, null_flags: frozenset[str] = frozenset()) -> str:
    if where is None:
        return ""
    parts = []
    if where.filter is not None:
        parts.append(f"({to_expr(where.filter, null_flags)})")
    if where.exclude is not None and len(where.exclude):
        parts.append(f"row not in [{', '.join(map(str, where.exclude.tolist()))}]")
    return " and ".join(parts)


def _wait_indexed(client: MilvusClient, name: str, progress: bool, timeout: float = 3600) -> None:
    """Block until the server has built the vector index of every flushed segment: a segment
    loaded before its index exists is searched by brute force (exact, slow), so a bundle's
    recall check and its first searches would not see the index it declares."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = client.describe_index(name, "vector")
        # Milvus 2.3 can leave pending_index_rows stale once every row is indexed
        indexed, total = int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))
        if int(info.get("pending_index_rows", 0)) == 0 or indexed >= total:
            return
        if progress:
            print(f"  milvus index: {info.get('indexed_rows')} / {info.get('total_rows')} rows")
        time.sleep(2.0)
    raise BundleError(f"Milvus did not index {name} within {timeout:g} s")


def _has_nullable_fields(client: MilvusClient, uri: str) -> bool:
    """Milvus Lite and Milvus >= 2.5 store nulls; 2.3 (the embedded server) does not."""
    if "://" not in uri:
        return True
    try:
        version = client.get_server_version()
    except MilvusException:
        return False
    digits = [int(p) for p in version.lstrip("v").split("-")[0].split(".")[:2] if p.isdigit()]
    return tuple(digits) >= (2, 5)


_TYPE_NAMES = {DataType.VARCHAR: "VARCHAR", DataType.BOOL: "BOOL", DataType.DOUBLE: "DOUBLE"}


def _value(x: Any, kind: str, name: str, row: int) -> Any:
    """One attribute value of an upsert as Milvus stores it (None = null)."""
    if x is None or (isinstance(x, float | np.floating) and np.isnan(x)):
        return None
    if isinstance(x, np.generic):
        x = x.item()
    if kind == "VARCHAR":
        if not isinstance(x, str):
            raise ItemWriteError(f"row {row}: attribute {name!r} must be a string, got {x!r}")
        if len(x.encode()) > MAX_VARCHAR:
            raise ItemWriteError(f"row {row}: attribute {name!r} is over {MAX_VARCHAR} bytes")
        return x
    if kind == "BOOL":
        if not isinstance(x, bool):
            raise ItemWriteError(f"row {row}: attribute {name!r} must be a bool, got {x!r}")
        return x
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ItemWriteError(f"row {row}: attribute {name!r} must be a number, got {x!r}")
    return float(x)


def _entities(
    rows: Sequence[int],
    vectors: np.ndarray,
    columns: Mapping[str, Sequence[Any]],
    fields: Mapping[str, str],
    null_flags: bool,
) -> list[dict[str, Any]]:
    """Row dicts for insert / upsert; with null flags a null is the type's placeholder and
    ``<field>__null`` true."""
    out = []
    for i, row in enumerate(rows):
        e: dict[str, Any] = {"row": int(row), "vector": vectors[i]}
        for name, vals in columns.items():
            v = vals[i]
            if null_flags:
                e[name] = PLACEHOLDER[fields[name]] if v is None else v
                e[name + NULL_FLAG] = v is None
            else:
                e[name] = v
        out.append(e)
    return out


def _index_params(kind: str, n: int, given: dict[str, Any]) -> dict[str, Any]:
    if kind == "ivf":
        from csmf.index.faiss import default_nlist

        return {"nlist": int(given.get("nlist") or default_nlist(n))}
    if kind == "hnsw":
        return {
            "M": int(given.get("M", 32)),
            "efConstruction": int(given.get("efConstruction", 200)),
        }
    return {}


def _default_search(kind: str, build: dict[str, Any]) -> dict[str, Any]:
    if kind == "ivf":
        return {"nprobe": min(32, build["nlist"])}
    if kind == "hnsw":
        return {"ef": 128}
    return {}


def _drop_quietly(client: MilvusClient, name: str) -> None:
    with contextlib.suppress(Exception):  # best effort: the build already failed
        client.drop_collection(name)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
