"""One (method, seed) run of ``csmf bench quality`` → a JSON-able record, optionally in a fresh
process so its peak memory is its own.

Memory is the process's resident set (RSS), which is what torch's allocator, numpy, scipy and
implicit all end up in (``tracemalloc`` sees only Python's allocator and misses torch/BLAS
buffers). In a fresh ``spawn``-ed process, after imports and data loading the kernel's RSS
high-water mark is reset (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0); after training +
evaluation ``VmHWM`` is the peak during the method's own work. Reported: that peak
(``peak_rss_mb``), the RSS before the work (``base_rss_mb``: interpreter, libraries, encoded
data) and their difference (``peak_extra_mb``, what the method itself needed at its peak). Where
the reset is unavailable, ``ru_maxrss`` before/after is used instead (then ``peak_extra_mb`` is a
lower bound: the loading peak may hide part of it) and the record says so.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import tempfile
import traceback
from pathlib import Path

import numpy as np

from csmf.atomic import write_json
from csmf.errors import CsmfError
from trainer.baselines import MethodRun, run_method
from trainer.config import RunConfig
from trainer.encoding import Encoded
from trainer.pipeline import prepare


class BenchRunError(CsmfError, RuntimeError):
    """A benchmark run failed (in its own process)."""


def record(run: MethodRun, seed: int) -> dict:
    """What the cache and the table keep of a run (no tensors)."""
    rec = {
        "method": run.method,
        "seed": seed,
        "seconds": run.seconds,
        "train_seconds": run.train_seconds,
        "tune_seconds": run.tune_seconds,
        **run.result,
        "serving": [
            {"dims": int(v.shape[1]), "items": int(v.shape[0]), "weight": float(w)}
            for _, v, w in run.serving
        ],
    }
    if run.tuning is not None:
        rec["tuning"] = run.tuning
    return rec


def run_in_process(method: str, cfg: RunConfig, enc: Encoded, data: str | Path) -> MethodRun:
    return run_method(method, cfg, enc, log=lambda _: None, data=data)


# --------------------------------------------------------------------------- memory


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# --------------------------------------------------------------------------- fresh process


def save_vectors(run: MethodRun, path: Path) -> None:
    """The run's serving layout with its vectors (query, items, weight per index) as ``.npz``:
    what the serving-cost table (bench/table4.py) searches."""
    arrays = {}
    for j, (q, v, w) in enumerate(run.serving):
        arrays[f"query{j}"] = q.numpy().astype(np.float32)
        arrays[f"items{j}"] = v.numpy().astype(np.float32)
        arrays[f"weight{j}"] = np.float32(w)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _child(method: str, cfg_dict: dict, data: str, out: str, vectors: str | None = None) -> None:
    try:
        cfg = RunConfig.from_dict(cfg_dict)
        enc = prepare(cfg, data)
        if _reset_peak():
            how = "VmHWM after resetting it (/proc/self/clear_refs) once data was loaded"
            base = _status_kb()["VmRSS"]
            run = run_in_process(method, cfg, enc, data)
            peak = _status_kb()["VmHWM"]
        else:
            how = "ru_maxrss before/after the run (extra is a lower bound)"
            base = _maxrss_kb()
            run = run_in_process(method, cfg, enc, data)
            peak = _maxrss_kb()
        rec = record(run, cfg.train.seed)
        if vectors:
            save_vectors(run, Path(vectors))
        rec["memory"] = {
            "peak_rss_mb": peak / 1024,
            "base_rss_mb": base / 1024,
            "peak_extra_mb": max(peak - base, 0) / 1024,
            "measured": how,
        }
        write_json(Path(out), rec)
    except BaseException as exc:  # reported to the parent, which raises BenchRunError
        write_json(
            Path(out), {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        )
        raise SystemExit(1) from None


def run_isolated(
    method: str, cfg: RunConfig, data: str | Path, vectors: str | Path | None = None
) -> dict:
    """Run ``method`` with ``cfg`` in a fresh ``spawn``-ed process; its record with memory
    (and its serving vectors in ``vectors``, an ``.npz``, if given)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="csmf-bench-") as tmp:
        out = Path(tmp) / "run.json"
        args = (method, cfg.to_dict(), str(data), str(out), str(vectors) if vectors else None)
        proc = ctx.Process(target=_child, args=args)
        proc.start()
        proc.join()
        rec = json.loads(out.read_text()) if out.exists() else None
    if rec is None or "error" in rec or proc.exitcode != 0:
        why = rec["error"] if rec and "error" in rec else f"exit code {proc.exitcode}"
        raise BenchRunError(f"{method} (seed {cfg.train.seed}) failed in its process: {why}")
    return rec
