"""What a cached benchmark run depends on, as one key: the one run cache of ``csmf bench`` and the
scripts in ``bench/``.

:func:`key_of` hashes a run's parts (canonical JSON); :func:`source_key` is the code part of a run
that executes the packages (e.g. a ``csmf train`` subprocess) and :func:`bench_fingerprint` the
dataset part; :func:`holds` / :func:`remember` keep a run folder's parts beside it, so a folder is
reused only for the same parts.

A (method, seed) result of ``csmf bench quality`` may be reused only if everything that can change
its numbers is unchanged:

- the fully resolved config (``RunConfig.to_dict()`` after ``--set`` and the seed);
- the dataset: the content fingerprint training records in its checkpoint
  (:func:`csmf.checkpoint.dataset_fingerprint` of the files training reads), plus the synthetic
  ground truth the oracle method reads (:data:`DATASET_EXTRA`). Earlier the cache hashed
  every file itself (``dataset.json`` too, which changes with each conversion's ``created_at``);
  keys made before that are simply never hit again;
- the method and the seed;
- the code: a hash of the source of the training / evaluation code the method runs
  (:func:`code_version`; for the CF baselines this includes their validation grids) and the
  versions of the numeric libraries.

Anything else (another ``--set``, a regenerated dataset, an edited loss or grid) re-runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csmf.atomic import write_json
from csmf.checkpoint import dataset_files, dataset_fingerprint

if TYPE_CHECKING:
    from trainer.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
# bench/harness/run.py runs (and measures) a method in its own process: result code too
PACKAGES = ("csmf", "trainer", "bench/harness")
# Presentation only (tables, CLIs, sweeps): editing them cannot change a method's numbers.
NOT_RESULT_CODE = frozenset(
    {
        "csmf/cli.py",
        "trainer/cli.py",
        "bench/harness/__init__.py",
        "bench/harness/cli.py",
        "bench/harness/cache.py",
        "bench/harness/report.py",
        "bench/harness/sensitivity.py",
        "bench/harness/significance.py",
        "bench/harness/paper_tables.py",
    }
)
CF_CODE = "trainer/cf_baselines.py"  # only the CF baselines run it (and its grids)
# Modules only some methods run: an edit to one re-runs only those methods.
METHOD_CODE = {
    "trainer/baselines/mvke.py": {"mvke"},
    "trainer/baselines/dmmp.py": {"dmmp"},
    "trainer/baselines/dtml.py": {"dtml"},
    "trainer/baselines/two_tower.py": {"dtml", "moppr"},
    "trainer/baselines/moppr.py": {"moppr"},
    "trainer/baselines/teacher.py": {"dmmp", "dtml"},
    "trainer/baselines/joint.py": {"mvke", "dmmp", "dtml"},
}
LIBRARIES = ("numpy", "torch", "scipy", "implicit", "faiss-cpu", "pyarrow")
DATASET_EXTRA = ("truth.npz",)  # read by the oracle method, not by training
KEY_FILE = "bench-key.json"  # a run folder's parts (holds / remember)


def key_of(parts: Mapping[str, Any]) -> str:
    """The hex SHA-256 of ``parts`` as canonical JSON: what every cached run is keyed by."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def holds(folder: Path, parts: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds a run made from exactly ``parts`` (:func:`remember`)."""
    path = folder / KEY_FILE
    return path.is_file() and json.loads(path.read_text()) == json.loads(
        json.dumps(parts, default=str)
    )


def remember(folder: Path, parts: Mapping[str, Any]) -> None:
    """Record that ``folder`` now holds the run made from ``parts`` (after it is complete)."""
    write_json(folder / KEY_FILE, dict(parts))


def source_key(packages: Sequence[str] = ("csmf", "trainer")) -> str:
    """A hash of every module under ``packages`` (paths relative to the repo): the code part of
    the key of a run that executes them, committed or not."""
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            h.update(f"{rel}\0{_file_hash(rel)}\0".encode())
    return h.hexdigest()[:16]


def bench_fingerprint(folder: str | Path) -> str:
    """The dataset part of a cache key: training's fingerprint over its files + DATASET_EXTRA."""
    return dataset_fingerprint(dataset_files(folder, DATASET_EXTRA))


def result_code_files(method: str) -> list[str]:
    """Source files (relative to the repo root) whose content the results of ``method`` depend
    on: every module of ``csmf/``, ``trainer/`` and ``bench/harness/`` except presentation code, the CF module
    only for the CF baselines, and each of :data:`METHOD_CODE` only for its methods."""
    from trainer.cf_baselines import CF_METHODS

    files = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in NOT_RESULT_CODE or (rel == CF_CODE and method not in CF_METHODS):
                continue
            if rel in METHOD_CODE and method not in METHOD_CODE[rel]:
                continue
            files.append(rel)
    return files


@cache
def _file_hash(rel: str) -> str:
    return hashlib.sha256((ROOT / rel).read_bytes()).hexdigest()


def code_version(method: str) -> dict:
    """{"source": hash of the method's result code, "libraries": {name: version}}."""
    h = hashlib.sha256()
    for rel in result_code_files(method):
        h.update(f"{rel}\0{_file_hash(rel)}\0".encode())
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = None
    return {"source": h.hexdigest(), "libraries": libs}


def cache_key(cfg: RunConfig, fingerprint: str, method: str, seed: int) -> tuple[str, dict]:
    """(hex key, the parts it hashes) for one (method, seed) run."""
    parts = {
        "config": cfg.to_dict(),
        "dataset": fingerprint,
        "method": method,
        "seed": seed,
        "code": code_version(method),
    }
    return key_of(parts), parts
