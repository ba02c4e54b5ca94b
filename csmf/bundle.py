"""The index-builder → service file format: a bundle folder
(docs/design.md#the-bundle-and-its-manifest).

```
bundles/NAME/
  manifest.json      format, model version, objectives, slice sizes, index type + search params,
                     item/user counts, recall check, SHA-256 + size of every other file, ...
  user_encoder.npz   numpy user tower (csmf.user_encoder), final layer permuted like the items
  item_encoder.npz   numpy item tower, the same format: vectors of written items from their
                     features (csmf.catalogue); absent in bundles built before item writes
  index.faiss        FAISS backend: inner-product index over permuted, unscaled item vectors;
                     id = row (csmf.index.faiss; IVF-PQ adds vectors.npy). A Milvus-backed
                     bundle has no index file: the manifest names the URI and collection alias
  items.parquet      row-aligned with the index: item_id + display columns (e.g. title) +
                     filterable attribute columns (manifest.attributes)
  users.parquet      embedded feature-store snapshot: the user id column, raw features, history
  user_tower.onnx    optional (build-index --onnx): the same user tower as ONNX, for
                     CSMF_ENCODER=onnx (csmf.onnx_encoder)
```

The builder writes every file into a staging folder, the manifest last, then renames the folder
into place (index_builder/publish.py); a folder without a manifest is not a bundle. The manifest
is one typed, versioned model (:class:`Manifest`); nothing reads it by string keys. The loader
validates it (format 1 bundles are upgraded, others refused naming the version), verifies every
file's size and SHA-256 and that all dimensions agree, and raises :class:`BundleError` with a
message specific to each failure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from csmf.atomic import atomic_write_text
from csmf.errors import BundleError
from csmf.index import IndexSpec, VectorIndex, Where, open_index
from csmf.index.filters import ItemAttributes
from csmf.onnx_encoder import ENCODERS, ONNX_FILE, OnnxUserEncoder
from csmf.user_encoder import CodedHistory, HistoryTable, UserEncoder
from csmf.weights import parse_weights, slice_scale

BUNDLE_FORMAT = 2  # 2: typed manifest, index backends (index.backend/files), item attributes
MANIFEST_NAME = "manifest.json"
ENCODER_FILE = "user_encoder.npz"
ITEM_ENCODER_FILE = "item_encoder.npz"  # optional: older bundles have none
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
BUNDLE_FILES = (ENCODER_FILE, ITEMS_FILE, USERS_FILE)  # + the index's own files (index.files)
HISTORY_COLUMN = "history"
ITEM_ID_COLUMN = "item_id"
STAGING_MARKER = ".staging-"  # builds happen in "<parent>/.<name>.staging-<pid>-<rand>"


# -- the manifest ---------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(_Model):
    sha256: str
    bytes: int = Field(ge=0)


class Attribute(_Model):
    """A filterable item column, stored in items.parquet (see csmf.index.filters)."""

    name: str
    type: Literal["string", "number", "bool"]


class WeightRecall(_Model):
    weights: list[float]
    recall: float


class RecallCheck(_Model):
    """ANN recall@k against exact search on weighted queries (index_builder/recall.py)."""

    k: int
    queries: int
    by_weights: list[WeightRecall]
    min_recall: float
    floor: float
    passed: bool
    bytes_per_item: float | None = None


class ItemsLog(_Model):
    """Where this bundle's write-ahead item log is and how much of it the bundle already holds
    (docs/design.md#item-writes). A built bundle has none: its log is ``../<name>.items.log``."""

    file: str = Field(description="the log, relative to the bundle folder")
    applied_seq: int = Field(0, ge=0, description="records up to this seq are folded in")
    compacted_from: str | None = None


class Manifest(_Model):
    """manifest.json: everything a reader needs to trust and load the bundle. Provenance
    sections (``snapshot``, ``model``, ``training``, ``source``, ``build``) are free-form: they
    are recorded for people, never read by code."""

    format: int
    model_version: str
    created_at: str = ""
    objectives: tuple[str, ...]
    slice_sizes: tuple[Annotated[int, Field(ge=0)], ...]
    dim: int = Field(ge=1)
    output_permutation: list[int] = Field(default_factory=list)
    item_count: int = Field(ge=0)
    user_count: int = Field(0, ge=0)
    user_id_column: str | None = None
    item_id_column: str = ITEM_ID_COLUMN
    display_columns: list[str] = Field(default_factory=list)
    attributes: list[Attribute] = Field(default_factory=list)
    index: IndexSpec
    recall_check: RecallCheck | None = None
    items_log: ItemsLog | None = None
    snapshot: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    build: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileRecord] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _dims_agree(self) -> Manifest:
        if len(self.objectives) != len(self.slice_sizes):
            raise ValueError(
                f"dimension mismatch: {len(self.objectives)} objectives {list(self.objectives)} "
                f"but {len(self.slice_sizes)} slice sizes {list(self.slice_sizes)}"
            )
        if sum(self.slice_sizes) != self.dim:
            raise ValueError(
                f"dimension mismatch: slice sizes {list(self.slice_sizes)} sum to "
                f"{sum(self.slice_sizes)}, manifest dim is {self.dim}"
            )
        off = self.index.item_offset
        if off is not None and len(off) != self.dim:
            raise ValueError(
                f"dimension mismatch: index.item_offset has {len(off)} values, dim is {self.dim}"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def summary(self) -> dict[str, Any]:
        """The manifest without the file list (GET /admin/bundle)."""
        return self.model_dump(mode="json", exclude={"files"})


# -- checksums and the manifest -------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, manifest: Manifest) -> Manifest:
    """Checksum every file in ``folder`` into ``manifest.files`` and write manifest.json last,
    atomically (tmp + fsync + rename). Returns the manifest as written."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST_NAME or not p.is_file() or p.name.endswith(".tmp"):
            continue
        files[p.name] = FileRecord(sha256=sha256_file(p), bytes=p.stat().st_size)
    out = manifest.model_copy(update={"files": files})
    text = out.to_json()
    atomic_write_text(folder / MANIFEST_NAME, text)
    return Manifest.model_validate_json(text)  # exactly what readers will see


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of the bundle at ``path`` (folder or manifest.json).
    Checks the format version (format 1 is upgraded, see :func:`upgrade_manifest`), every
    field's type and that the dimensions agree; does not touch the other files."""
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
        raw = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable manifest {mpath}: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"manifest {mpath} must be a JSON object, got {type(raw).__name__}")
    raw = upgrade_manifest(raw, mpath)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"invalid manifest {mpath}: {_first_error(exc)}") from None


def upgrade_manifest(raw: dict[str, Any], where: Path | str = "manifest") -> dict[str, Any]:
    """Bring a manifest dict of an older format to BUNDLE_FORMAT, or refuse naming the version.
    Format 1 (FAISS only, untyped) differs only by what format 2 made explicit: the backend and
    the index's file list; its bundles keep serving without a rebuild."""
    fmt = raw.get("format")
    if fmt == BUNDLE_FORMAT:
        return raw
    if fmt == 1:
        index = raw.get("index")
        if isinstance(index, dict):
            index = {"backend": "faiss", "files": [INDEX_FILE], **index}
        return {**raw, "format": BUNDLE_FORMAT, "index": index}
    raise BundleError(
        f"unsupported bundle format {fmt!r} in {where}; this version reads formats 1 and "
        f"{BUNDLE_FORMAT} — rebuild with `csmf build-index`"
    )


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "manifest"
    msg = e["msg"].removeprefix("Value error, ")
    got = "" if loc == "manifest" else f" (got {e.get('input')!r:.80})"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{got}{more}"


def verify_files(path: str | Path, manifest: Manifest) -> None:
    """Every bundle file is listed, present, of the recorded size and SHA-256."""
    folder = Path(path)
    files = manifest.files
    unlisted = [f for f in (*BUNDLE_FILES, *manifest.index.files) if f not in files]
    if unlisted:
        raise BundleError(f"manifest of {folder} does not list bundle files {unlisted}")
    for name, rec in files.items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"missing file {name} in bundle {folder}")
        size = p.stat().st_size
        if size != rec.bytes:
            raise BundleError(
                f"truncated or resized file {name} in bundle {folder}: "
                f"{size} bytes, manifest says {rec.bytes}"
            )
        digest = sha256_file(p)
        if digest != rec.sha256:
            raise BundleError(
                f"checksum mismatch for {name} in bundle {folder}: the file is corrupted "
                f"(sha256 {digest[:12]}…, manifest says {rec.sha256[:12]}…)"
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


# -- the bundle -----------------------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    encoder: UserEncoder | OnnxUserEncoder
    index: VectorIndex  # inner product over permuted, unscaled item vectors; id = row
    item_ids: np.ndarray  # (N,) object array of str
    item_meta: dict[str, list]  # display column → value per row
    users: UserSnapshot
    attributes: ItemAttributes = field(default_factory=lambda: ItemAttributes({}, 0))
    item_encoder: UserEncoder | None = None  # the item tower (bundles built with one)
    dead: np.ndarray | None = None  # (N,) bool: rows deleted by item writes (csmf.catalogue)

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.manifest.objectives

    @property
    def slice_sizes(self) -> tuple[int, ...]:  # output dims per objective, in cascade order
        return self.manifest.slice_sizes

    @property
    def model_version(self) -> str:  # content hash
        return self.manifest.model_version

    @property
    def index_type(self) -> str:
        return self.manifest.index.type

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def scale(self, weights: Sequence[float] | Mapping[str, float]) -> np.ndarray:
        """(D,) query scale for objective weights (list in cascade order or by name), validated."""
        return slice_scale(parse_weights(weights, self.objectives), self.slice_sizes)

    @cached_property
    def item_rows(self) -> dict[str, int]:
        """External item id → row (= index id)."""
        return {iid: i for i, iid in enumerate(self.item_ids.tolist())}

    def search(
        self, queries: np.ndarray, k: int, where: Where | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) already-scaled queries → (scores, rows), each (n, k); row -1 = no result.
        Scores are inner products with the item vectors."""
        return self.index.search(queries, k, where)

    def item_vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(rows), D) item vectors (e.g. for per-objective explain scores)."""
        return self.index.vectors(rows)

    def close(self) -> None:
        """Release the index's engine connection (Milvus; a Milvus Lite file is locked while
        open). FAISS indexes hold nothing to release."""
        self.index.close()

    def slice_bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each objective's slice in the permuted output."""
        ends = np.cumsum(self.slice_sizes).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))


def check_encoder(path: Path, manifest: Manifest, encoder: str) -> None:
    """The bundle can encode users with ``encoder`` (numpy: always; onnx: it holds a
    user_tower.onnx listed in its manifest)."""
    if encoder not in ENCODERS:
        raise BundleError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if encoder == "onnx" and ONNX_FILE not in manifest.files:
        raise BundleError(
            f"bundle {path} has no {ONNX_FILE} in its manifest, so it cannot encode with "
            "onnx: rebuild it with `csmf build-index --onnx`, or set CSMF_ENCODER=numpy"
        )


def load_bundle(
    path: str | Path, *, verify: bool = True, index_uri: str | None = None, encoder: str = "numpy"
) -> Bundle:
    """Load a bundle; with ``verify`` (default) check every file's size and SHA-256 first.
    Always validates the manifest and that all dimensions agree. ``index_uri`` overrides the
    URI of an engine-hosted index (Milvus; CSMF_INDEX_URI). ``encoder`` = what runs the user
    tower: ``numpy`` (user_encoder.npz) or ``onnx`` (the bundle's user_tower.onnx in
    onnxruntime; CSMF_ENCODER). Raises BundleError."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    dim = manifest.dim
    numpy_encoder = UserEncoder.load(path / ENCODER_FILE)
    if numpy_encoder.dim != dim:
        raise BundleError(
            f"dimension mismatch: user encoder outputs {numpy_encoder.dim} dims, manifest says {dim}"
        )
    check_encoder(path, manifest, encoder)
    user_encoder = numpy_encoder
    if encoder == "onnx":
        user_encoder = OnnxUserEncoder(numpy_encoder, path / ONNX_FILE)
    index = open_index(manifest.index, path, index_uri)
    if index.dim != dim:
        raise BundleError(
            f"dimension mismatch: index has dimension {index.dim}, manifest says {dim}"
        )
    if len(index) != manifest.item_count:
        raise BundleError(
            f"index holds {len(index)} vectors, manifest says {manifest.item_count} items"
        )
    item_ids, item_meta, attrs = _read_items(path / ITEMS_FILE, len(index), manifest)
    users = UserSnapshot.load(
        path / USERS_FILE, manifest.user_id_column or numpy_encoder.spec.id_column
    )
    bundle = Bundle(
        path=path,
        manifest=manifest,
        encoder=user_encoder,
        index=index,
        item_ids=item_ids,
        item_meta=item_meta,
        users=users,
        attributes=attrs,
    )
    if ITEM_ENCODER_FILE in manifest.files or (path / ITEM_ENCODER_FILE).is_file():
        item_encoder = UserEncoder.load(path / ITEM_ENCODER_FILE)
        if item_encoder.dim != dim:
            raise BundleError(
                f"dimension mismatch: item encoder outputs {item_encoder.dim} dims, manifest "
                f"says {dim}"
            )
        bundle.item_encoder = item_encoder
    users.resolve(numpy_encoder.item_vocab.index, bundle.item_rows)
    return bundle


def _read_items(
    path: Path, n: int, manifest: Manifest
) -> tuple[np.ndarray, dict[str, list], ItemAttributes]:
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
    attr_names = {a.name for a in manifest.attributes}
    display = set(manifest.display_columns) if manifest.display_columns else None
    meta = {
        c: table.column(c).to_pylist()
        for c in table.column_names
        if c != ITEM_ID_COLUMN and (c in display if display is not None else c not in attr_names)
    }
    missing = [a.name for a in manifest.attributes if a.name not in table.column_names]
    if missing:
        raise BundleError(f"item table {path} lacks the filterable columns {missing}")
    attrs = ItemAttributes.from_table(table, {a.name: a.type for a in manifest.attributes})
    return ids, meta, attrs
