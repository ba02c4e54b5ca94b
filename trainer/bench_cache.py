"""What a cached benchmark run depends on, as one key (issue 12, "honest benchmark mechanics").

A (method, seed) result of ``csmf bench quality`` may be reused only if everything that can change
its numbers is unchanged:

- the fully resolved config (``RunConfig.to_dict()`` after ``--set`` and the seed);
- the dataset: a content hash of every file in the dataset folder (:func:`dataset_fingerprint`);
- the method and the seed;
- the code: a hash of the source of the training / evaluation code the method runs
  (:func:`code_version`; for the CF baselines this includes their validation grids) and the
  versions of the numeric libraries.

Anything else (another ``--set``, a regenerated dataset, an edited loss or grid) re-runs.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path

from trainer.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("csmf", "trainer")
# Presentation only (tables, CLIs, sweeps): editing them cannot change a method's numbers.
NOT_RESULT_CODE = frozenset(
    {
        "csmf/cli.py",
        "trainer/bench_cli.py",
        "trainer/bench_cache.py",
        "trainer/report.py",
        "trainer/cli.py",
        "trainer/sensitivity.py",
    }
)
CF_CODE = "trainer/cf_baselines.py"  # only the CF baselines run it (and its grids)
LIBRARIES = ("numpy", "torch", "scipy", "implicit", "faiss-cpu", "pyarrow")


def dataset_fingerprint(folder: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 over the relative path and bytes of every file under ``folder`` (sorted; hidden
    entries such as a writer's ``.tmp-*`` staging folders are skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(chunk):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def result_code_files(method: str) -> list[str]:
    """Source files (relative to the repo root) whose content the results of ``method`` depend
    on: every module of ``csmf/`` and ``trainer/`` except presentation code, and the CF module
    only for the CF baselines."""
    from trainer.cf_baselines import CF_METHODS

    files = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in NOT_RESULT_CODE or (rel == CF_CODE and method not in CF_METHODS):
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
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), parts
