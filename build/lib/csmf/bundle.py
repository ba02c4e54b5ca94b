"""The index-builder → service file format: a bundle folder (DESIGN §4).

```
bundles/NAME/
  manifest.json      format, model version, objectives, slice sizes, index type + search params,
                     item/user counts, recall check, SHA-256 + size of every other file, ...
  user_encoder.npz   numpy user tower (csmf.user_encoder), final layer permuted like the items
  index.faiss        METRIC_INNER_PRODUCT index over permuted, unscaled item vectors; id = row
  items.parquet      row-aligned with the index: item_id + display columns (e.g. title)
  users.parquet      embedded feature-store snapshot: the user id column, raw features, history
```

The builder writes every file into a staging folder, the manifest last, then renames the folder
into place (index_builder/publish.py); a folder without a manifest is not a bundle. The loader
verifies the format version, every file's size and SHA-256, and that all dimensions agree, and
raises :class:`BundleError` with a message specific to each failure.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from csmf.errors import BundleError
from csmf.user_encoder import CodedHistory, HistoryTable, UserEncoder
from csmf.weights import parse_weights, slice_scale

BUNDLE_FORMAT = 1
MANIFEST_NAME = "manifest.json"
ENCODER_FILE = "user_encoder.npz"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
BUNDLE_FILES = (ENCODER_FILE, INDEX_FILE, ITEMS_FILE, USERS_FILE)
HISTORY_COLUMN = "history"
ITEM_ID_COLUMN = "item_id"
STAGING_MARKER = ".staging-"  # builds happen in "<parent>/.<name>.staging-<pid>-<rand>"
INDEX_TYPES = ("flat", "hnsw", "ivf")
REQUIRED_KEYS = (
    "format",
    "model_version",
    "objectives",
    "slice_sizes",
    "dim",
    "item_count",
    "index",
    "files",
)


# -- checksums and the manifest -------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Checksum every file in ``folder`` into ``manifest["files"]`` and write manifest.json last,
    atomically (tmp + fsync + rename). Returns the manifest as written."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST_NAME or not p.is_file() or p.name.endswith(".tmp"):
            continue
        files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    text = json.dumps({**manifest, "files": files}, indent=2) + "\n"
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)
    fsync_path(folder)
    return json.loads(text)  # exactly what readers will see (tuples become lists)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check the manifest of the bundle at ``path`` (folder or manifest.json).
    Checks the format version and required keys; does not touch the other files."""
    path = Path(path)
    folder = path.parent if path.name == MANIFEST_NAME else path
    if not folder.is_dir():
        raise BundleError(
            f"no bundle at {folder}: not a directory; build one with `csmf build-index`"
        )
    if STAGING_MARKER in folder.name:
        raise BundleError(
            f"{folder} is an unpublished staging folder of an interrupted build, not a bundle"
        )
    mpath = folder / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(
            f"no {MANIFEST_NAME} in {folder}: not a bundle (or an interrupted build); "
            "build one with `csmf build-index`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable manifest {mpath}: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest {mpath} must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"unsupported bundle format {manifest.get('format')!r} in {mpath}; "
            f"this version reads format {BUNDLE_FORMAT} — rebuild with `csmf build-index`"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"manifest {mpath} lacks required keys {missing}")
    return manifest


def verify_files(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Every bundle file is listed, present, of the recorded size and SHA-256."""
    folder = Path(path)
    files = manifest["files"]
    unlisted = [f for f in BUNDLE_FILES if f not in files]
    if unlisted:
        raise BundleError(f"manifest of {folder} does not list bundle files {unlisted}")
    for name, rec in files.items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"missing file {name} in bundle {folder}")
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise BundleError(
                f"truncated or resized file {name} in bundle {folder}: "
                f"{size} bytes, manifest says {rec['bytes']}"
            )
        digest = sha256_file(p)
        if digest != rec["sha256"]:
            raise BundleError(
                f"checksum mismatch for {name} in bundle {folder}: the file is corrupted "
                f"(sha256 {digest[:12]}…, manifest says {rec['sha256'][:12]}…)"
            )


# -- the embedded feature-store snapshot ----------------------------------------------------------


class UserSnapshot:
    """Raw features and history of every known user, for the embedded feature store.

    ``get(user_id)`` returns ``(features, history)``: ``features`` maps column → raw value and
    always includes the id column (so ``UserEncoder.encode([features], [history])`` sees the id);
    ``history`` is external item ids, oldest → newest, as a :class:`CodedHistory` (it reads like a
    list). Once :meth:`resolve` has run (``load_bundle`` does it), the encoder and the service
    read its vocabulary indexes and index rows with numpy gathers. Unknown user → ``None``.
    """

    def __init__(
        self,
        id_column: str,
        ids: Sequence[str],
        columns: Mapping[str, list],
        hist_offsets: np.ndarray,
        hist_codes: np.ndarray,
        hist_vocab: list[str],
    ) -> None:
        self.id_column = id_column
        self.ids = list(ids)
        self._columns = dict(columns)
        self._offsets = hist_offsets  # (U+1,) int64
        self._codes = hist_codes  # (E,) int32 into hist_vocab
        self.history_table = HistoryTable(hist_vocab)
        self._row = {uid: i for i, uid in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise BundleError(f"user snapshot has duplicate {id_column} values")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, user_id: object) -> bool:
        return str(user_id) in self._row

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return tuple(self._columns)

    def resolve(self, item_index: Mapping[str, int], item_rows: Mapping[str, int]) -> None:
        """Resolve every distinct history item once: encoder vocabulary index and index row."""
        self.history_table.resolve(item_index, item_rows)

    def get(self, user_id: Any) -> tuple[dict[str, Any], CodedHistory] | None:
        i = self._row.get(user_id if type(user_id) is str else str(user_id))
        if i is None:
            return None
        features = {c: col[i] for c, col in self._columns.items()}
        features[self.id_column] = self.ids[i]
        codes = self._codes[self._offsets[i] : self._offsets[i + 1]]
        return features, CodedHistory(codes, self.history_table)

    @classmethod
    def load(cls, path: str | Path, id_column: str) -> UserSnapshot:
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise BundleError(f"cannot read user snapshot {path}: {exc}") from None
        for col in (id_column, HISTORY_COLUMN):
            if col not in table.column_names:
                raise BundleError(f"user snapshot {path} lacks column {col!r}")
        ids = [str(v) for v in table.column(id_column).to_pylist()]
        columns = {
            c: table.column(c).to_pylist()
            for c in table.column_names
            if c not in (id_column, HISTORY_COLUMN)
        }
        hist = table.column(HISTORY_COLUMN).combine_chunks()
        if not pa.types.is_list(hist.type) and not pa.types.is_large_list(hist.type):
            raise BundleError(
                f"user snapshot column {HISTORY_COLUMN!r} must be a list, got {hist.type}"
            )
        offsets = hist.offsets.to_numpy().astype(np.int64)
        values = hist.values.slice(offsets[0], offsets[-1] - offsets[0]).cast(pa.string())
        offsets -= offsets[0]
        encoded = values.dictionary_encode()
        return cls(
            id_column,
            ids,
            columns,
            offsets,
            encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            [str(v) for v in encoded.dictionary.to_pylist()],
        )

    @staticmethod
    def write(
        path: str | Path,
        id_column: str,
        ids: Sequence[str],
        columns: Mapping[str, Any],
        histories: Sequence[Sequence[str]] | pa.Array,
    ) -> Path:
        """Write a snapshot: ids, raw feature columns (each a sequence or pyarrow array aligned
        with ``ids``) and per-user histories (external item ids, oldest → newest; a list of lists
        or a pyarrow list<string> array)."""
        if len(histories) != len(ids):
            raise BundleError(f"got {len(histories)} histories for {len(ids)} users")
        if HISTORY_COLUMN in columns or id_column in columns:
            raise BundleError(
                f"user feature columns may not be named {id_column!r} or {HISTORY_COLUMN!r}"
            )
        data = {id_column: pa.array([str(i) for i in ids], pa.string())}
        for c, v in columns.items():
            data[c] = v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(v)
        if isinstance(histories, pa.Array):
            data[HISTORY_COLUMN] = histories
        else:
            data[HISTORY_COLUMN] = pa.array(
                [[str(h) for h in hs] for hs in histories], pa.list_(pa.string())
            )
        pq.write_table(pa.table(data), path)
        return Path(path)


# -- search parameters ----------------------------------------------------------------------------


def apply_search_params(index: faiss.Index, kind: str, params: Mapping[str, Any]) -> None:
    """Set the index's own search-time parameters from the manifest (efSearch / nprobe)."""
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


def make_search_params(
    kind: str, params: Mapping[str, Any], sel: faiss.IDSelector | None = None
) -> faiss.SearchParameters:
    """Per-call FAISS search parameters carrying the manifest's efSearch/nprobe.

    A SearchParameters object *replaces* the index's own efSearch/nprobe with its defaults
    (efSearch=16, nprobe=1), so every per-call parameter object must carry them explicitly.
    HNSW keeps ``bounded_queue=True``: with False, faiss <= 1.15 ignores ``sel`` (faiss #5504).
    """
    if kind == "hnsw":
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(params["ef_search"])
        p.bounded_queue = True
    elif kind == "ivf":
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params["nprobe"])
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
        p._sel_ref = sel  # the C++ object holds a raw pointer; keep the Python owner alive
    return p


# -- the bundle -----------------------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    manifest: dict
    objectives: tuple[str, ...]
    slice_sizes: tuple[int, ...]  # output dims per objective, contiguous in cascade order
    model_version: str  # content hash
    encoder: UserEncoder
    index: faiss.Index  # METRIC_INNER_PRODUCT over permuted, unscaled item vectors; id = row
    item_ids: np.ndarray  # (N,) object array of str
    item_meta: dict[str, list]  # display column → value per row
    users: UserSnapshot
    index_type: str = "flat"
    search_config: dict = field(default_factory=dict)  # ef_search / nprobe from the manifest
    # The index stores item - item_offset (all zeros unless the build centred, e.g. for HNSW).
    # Rankings are unaffected; the score of row i for query q is index distance + q·item_offset.
    # search() and item_vectors() add it back; raw index.search callers must do the same.
    item_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    centered: bool = field(init=False)  # a nonzero item_offset (read once per search)

    def __post_init__(self) -> None:
        if self.item_offset.size == 0:
            self.item_offset = np.zeros(self.dim, np.float32)
        self.centered = bool(np.any(self.item_offset))

    @property
    def dim(self) -> int:
        return int(sum(self.slice_sizes))

    def scale(self, weights: Sequence[float] | Mapping[str, float]) -> np.ndarray:
        """(D,) query scale for objective weights (list in cascade order or by name), validated."""
        return slice_scale(parse_weights(weights, self.objectives), self.slice_sizes)

    @cached_property
    def item_rows(self) -> dict[str, int]:
        """External item id → row (= FAISS id)."""
        return {iid: i for i, iid in enumerate(self.item_ids.tolist())}

    def search_params(self, sel: faiss.IDSelector | None = None) -> faiss.SearchParameters:
        """SearchParameters with this bundle's efSearch/nprobe (and an optional ID selector)."""
        return make_search_params(self.index_type, self.search_config, sel)

    def search(
        self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) already-scaled queries → (scores, rows), each (n, k); row -1 = no result.
        Scores are exact inner products with the item vectors (offset added back)."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        params = None if sel is None else self.search_params(sel)
        scores, rows = self.index.search(q, k, params=params)
        if self.centered:
            scores += (q @ self.item_offset)[:, None]
        return scores, rows

    def item_vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(rows), D) item vectors (e.g. for per-objective explain scores)."""
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64)) + self.item_offset

    def slice_bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each objective's slice in the permuted output."""
        ends = np.cumsum(self.slice_sizes).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load a bundle; with ``verify`` (default) check every file's size and SHA-256 first.
    Always checks the format version and that all dimensions agree. Raises BundleError."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    objectives = tuple(manifest["objectives"])
    slice_sizes = tuple(int(s) for s in manifest["slice_sizes"])
    dim = int(manifest["dim"])
    _check_manifest_dims(objectives, slice_sizes, dim)
    idx = manifest["index"]
    kind = idx.get("type")
    if kind not in INDEX_TYPES:
        raise BundleError(f"manifest index.type must be one of {INDEX_TYPES}, got {kind!r}")
    encoder = UserEncoder.load(path / ENCODER_FILE)
    if encoder.dim != dim:
        raise BundleError(
            f"dimension mismatch: user encoder outputs {encoder.dim} dims, manifest says {dim}"
        )
    index = _read_index(path / INDEX_FILE)
    _check_index(index, kind, dim, int(manifest["item_count"]))
    search_config = dict(idx.get("search_params", {}))
    apply_search_params(index, kind, search_config)
    offset = np.asarray(idx.get("item_offset") or np.zeros(dim), dtype=np.float32)
    if offset.shape != (dim,):
        raise BundleError(
            f"dimension mismatch: index.item_offset has shape {offset.shape}, manifest dim is {dim}"
        )
    item_ids, item_meta = _read_items(path / ITEMS_FILE, index.ntotal)
    users = UserSnapshot.load(
        path / USERS_FILE, manifest.get("user_id_column", encoder.spec.id_column)
    )
    bundle = Bundle(
        path=path,
        manifest=manifest,
        objectives=objectives,
        slice_sizes=slice_sizes,
        model_version=str(manifest["model_version"]),
        encoder=encoder,
        index=index,
        item_ids=item_ids,
        item_meta=item_meta,
        users=users,
        index_type=kind,
        search_config=search_config,
        item_offset=offset,
    )
    users.resolve(encoder.item_vocab._index, bundle.item_rows)
    return bundle


def _check_manifest_dims(
    objectives: tuple[str, ...], slice_sizes: tuple[int, ...], dim: int
) -> None:
    if len(objectives) != len(slice_sizes):
        raise BundleError(
            f"dimension mismatch: manifest lists {len(objectives)} objectives {list(objectives)} "
            f"but {len(slice_sizes)} slice sizes {list(slice_sizes)}"
        )
    if any(s < 0 for s in slice_sizes) or sum(slice_sizes) != dim:
        raise BundleError(
            f"dimension mismatch: slice sizes {list(slice_sizes)} sum to {sum(slice_sizes)}, "
            f"manifest dim is {dim}"
        )


def _read_index(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except Exception as exc:  # faiss raises RuntimeError with the C++ message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"cannot read FAISS index {path}: {first}") from None


def _check_index(index: faiss.Index, kind: str, dim: int, item_count: int) -> None:
    if index.d != dim:
        raise BundleError(f"dimension mismatch: index has dimension {index.d}, manifest says {dim}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"index metric is {index.metric_type}, expected inner product (0)")
    if index.ntotal != item_count:
        raise BundleError(f"index holds {index.ntotal} vectors, manifest says {item_count} items")
    expected = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf": faiss.IndexIVF}[kind]
    if not isinstance(faiss.downcast_index(index), expected):
        got = type(faiss.downcast_index(index)).__name__
        raise BundleError(f"manifest says index type {kind!r}, the file holds a {got}")


def _read_items(path: Path, n: int) -> tuple[np.ndarray, dict[str, list]]:
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise BundleError(f"cannot read item table {path}: {exc}") from None
    if ITEM_ID_COLUMN not in table.column_names:
        raise BundleError(f"item table {path} lacks column {ITEM_ID_COLUMN!r}")
    if table.num_rows != n:
        raise BundleError(
            f"item table {path} has {table.num_rows} rows, the index holds {n} vectors"
        )
    ids = np.array([str(v) for v in table.column(ITEM_ID_COLUMN).to_pylist()], dtype=object)
    meta = {c: table.column(c).to_pylist() for c in table.column_names if c != ITEM_ID_COLUMN}
    return ids, meta
