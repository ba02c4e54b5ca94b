"""MovieLens-100K: fetch it from the ``recbole==1.2.1`` wheel and convert it to the csmf format.

The wheel ships RecBole's "atomic files" ``ml-100k.{inter,user,item}`` (tab separated, header
``name:type``). We download the wheel once with ``pip download --no-deps`` into
``<cache>/wheels`` (never install recbole), extract only those three files into
``<cache>/ml-100k`` and check each against a pinned SHA-256.

Cascade: every rating is an exposure, click = rating >= 4, conversion = rating == 5; ``rating``
stays as an extra events column. Events are ordered by timestamp (stable: ties keep file order).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from csmf.atomic import atomic_write_bytes
from csmf.errors import DataError
from trainer.data.dataset import load_dataset, staged_dataset, write_meta

RECBOLE = "recbole==1.2.1"
WHEEL = "recbole-1.2.1-py3-none-any.whl"
_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
# kind → (file name inside the wheel's ml-100k folder, pinned SHA-256)
SOURCES: dict[str, tuple[str, str]] = {
    "inter": ("ml-100k.inter", "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
    "user": ("ml-100k.user", "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
    "item": ("ml-100k.item", "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
}
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


def default_cache_dir() -> Path:
    env = os.environ.get("CSMF_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "csmf"


# --------------------------------------------------------------------------- fetch


def fetch_ml100k(
    cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Path]:
    """Return verified paths ``{"inter", "user", "item"}``, downloading the wheel only if needed."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = cache / "ml-100k"
    paths = {kind: dest / fname for kind, (fname, _) in SOURCES.items()}
    if all(p.exists() and _sha256(p) == SOURCES[k][1] for k, p in paths.items()):
        return paths
    wheel = _ensure_wheel(cache / "wheels", log)
    _extract(wheel, paths)
    return paths


def _ensure_wheel(wheels: Path, log: Callable[[str], None] | None) -> Path:
    wheel = wheels / WHEEL
    if wheel.exists():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"downloading {RECBOLE} (MovieLens-100K) with pip into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", RECBOLE, "-d", str(wheels)]
    hint = f"connect to the package index or put {WHEEL} into {wheels}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"could not run pip to download {RECBOLE} ({exc}); {hint}") from None
    if proc.returncode != 0 or not wheel.exists():
        said = _pip_error(proc.stderr + "\n" + proc.stdout)
        raise DataError(
            f"could not download {RECBOLE} from the package index (pip said: {said}); {hint}"
        )
    return wheel


def _pip_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    picked = errors[-1] if errors else (lines[-1] if lines else "no output")
    return picked.removeprefix("ERROR:").strip()


def _extract(wheel: Path, paths: dict[str, Path]) -> None:
    retry = f"delete {wheel} and run again to download a fresh copy"
    try:
        with zipfile.ZipFile(wheel) as zf:
            blobs = {k: zf.read(_MEMBER_DIR + SOURCES[k][0]) for k in paths}
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{wheel} is not a readable wheel ({exc}); {retry}") from None
    except KeyError as exc:
        raise DataError(f"{wheel} does not contain {exc.args[0]}; {retry}") from None
    for kind, data in blobs.items():
        got, want = hashlib.sha256(data).hexdigest(), SOURCES[kind][1]
        if got != want:
            raise DataError(
                f"checksum mismatch for {SOURCES[kind][0]} in {wheel}: expected sha256 {want}, "
                f"got {got}; {retry}"
            )
    for kind, data in blobs.items():
        path = paths[kind]
        atomic_write_bytes(path, data)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- convert


def convert_ml100k(src: dict[str, Path], out: str | Path) -> dict[str, int]:
    """Convert RecBole atomic files ``src = {"inter", "user", "item"}`` into a dataset at ``out``.

    Returns the counts written to ``dataset.json``. Works on any files in the ml-100k layout
    (tests use tiny hand-made ones); the output is validated with ``load_dataset`` before it
    replaces anything in ``out``.
    """
    missing = sorted({"inter", "user", "item"} - set(src))
    if missing:
        raise DataError(f"ml-100k source is missing {', '.join(missing)} (got {sorted(src)})")
    src = {k: Path(v) for k, v in src.items()}
    events = _events(_read_atomic(src["inter"], ("user_id", "item_id", "rating", "timestamp")))
    users = _users(
        _read_atomic(src["user"], ("user_id", "age", "gender", "occupation", "zip_code"))
    )
    items = _items(_read_atomic(src["item"], ("item_id", "movie_title", "release_year", "class")))
    counts = {
        "users": users.num_rows,
        "items": items.num_rows,
        "exposures": events.num_rows,
        "clicks": int(pc.sum(events["clicked"].cast(pa.int64())).as_py() or 0),
        "conversions": int(pc.sum(events["converted"].cast(pa.int64())).as_py() or 0),
    }
    meta = {
        "name": "ml-100k",
        "source": {
            "package": RECBOLE,
            "files": {p.name: {"sha256": _sha256(p)} for p in (src[k] for k in SOURCES)},
        },
        "cascade": "exposure = rated, click = rating >= 4, conversion = rating == 5",
        "counts": counts,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with staged_dataset(out) as tmp:
        pq.write_table(events, tmp / "events.parquet")
        pq.write_table(users, tmp / "users.parquet")
        pq.write_table(items, tmp / "items.parquet")
        load_dataset(tmp)  # never publish something the loader would reject
        write_meta(tmp, meta)
    return counts


def _read_atomic(path: Path, columns: tuple[str, ...]) -> pa.Table:
    """Read a RecBole atomic file as strings, with ``name:type`` headers reduced to ``name``."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\r\n").split("\t")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    names = [h.split(":", 1)[0] for h in header]
    absent = [c for c in columns if c not in names]
    if absent:
        raise DataError(
            f"{path.name}: missing column(s) {', '.join(absent)} (header: {', '.join(names)})"
        )
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                include_columns=list(columns),
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path.name}: malformed ({' '.join(str(exc).split())})") from None


def _to_int(table: pa.Table, col: str, name: str) -> pa.Array:
    """Parse a string column of whole numbers (``881250949`` or ``881250949.0``) to int64."""
    try:
        return pc.cast(pc.cast(table[col], pa.float64()), pa.int64()).combine_chunks()
    except pa.ArrowInvalid:
        values = table[col].to_pylist()
        bad = [v for v in values if not _is_whole(v)]
        raise DataError(
            f"{name}: column {col} has {len(bad)} values that are not whole numbers "
            f"(e.g. {', '.join(map(repr, bad[:3]))})"
        ) from None


def _is_whole(v: str) -> bool:
    try:
        return float(v).is_integer()
    except ValueError:
        return False


def _events(inter: pa.Table) -> pa.Table:
    name = "ml-100k.inter"
    rating = _to_int(inter, "rating", name).to_numpy()
    ts = _to_int(inter, "timestamp", name).to_numpy()
    order = np.argsort(ts, kind="stable")
    return pa.table(
        {
            "user_id": _to_int(inter, "user_id", name).take(order),
            "item_id": _to_int(inter, "item_id", name).take(order),
            "timestamp": pa.array(ts[order], pa.int64()),
            "clicked": pa.array(rating[order] >= 4),
            "converted": pa.array(rating[order] == 5),
            "rating": pa.array(rating[order].astype(np.int8)),
        }
    )


def _users(raw: pa.Table) -> pa.Table:
    user_id = _to_int(raw, "user_id", "ml-100k.user")
    age = _to_int(raw, "age", "ml-100k.user").to_numpy()
    buckets = np.asarray(AGE_BUCKETS, dtype=object)[np.digitize(age, AGE_EDGES)]
    zip_code = raw["zip_code"].combine_chunks()
    first = pc.utf8_slice_codeunits(zip_code, 0, 1)
    zip_prefix = pc.if_else(pc.ascii_is_decimal(first), first, pa.scalar("other"))
    table = pa.table(
        {
            "user_id": user_id,
            "age_bucket": pa.array(buckets, pa.string()),
            "gender": raw["gender"].combine_chunks(),
            "occupation": raw["occupation"].combine_chunks(),
            "zip_prefix": zip_prefix,
        }
    )
    return table.sort_by("user_id")


def _items(raw: pa.Table) -> pa.Table:
    years = raw["release_year"].to_pylist()
    table = pa.table(
        {
            "item_id": _to_int(raw, "item_id", "ml-100k.item"),
            "genres": pa.array(
                [[g for g in s.split(" ") if g] for s in raw["class"].to_pylist()],
                pa.list_(pa.string()),
            ),
            "year_bucket": pa.array([_decade(y) for y in years], pa.string()),
            "title": raw["movie_title"].combine_chunks(),
        }
    )
    return table.sort_by("item_id")


def _decade(year: str) -> str:
    y = year.strip()
    return f"{int(y) // 10 * 10}s" if len(y) == 4 and y.isdigit() else "unknown"
