"""Flame graphs of a loaded service worker (py-spy), for the retrieve and the batch paths.

    .venv/bin/python bench/serve_profile.py --items 1000000 --tag after

Starts ``csmf serve --workers 2`` on the bench bundle (bench/serve_data.py), drives it with wrk
(the bodies of bench/serve.py, 16 connections) or with the batch client (500 users per call,
k=10), and records one worker with ``py-spy record`` (``--nonblocking``, native frames off) for
``--seconds``. Writes ``bench/results/profile-<tag>-retrieve.svg`` and ``…-batch.svg``.
py-spy: ``pip install py-spy`` (needs ptrace; root in the container is enough).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from serve import (
    BATCH_CLIENT,
    _free_port,
    _stop,
    _tree_cpu,
    _wait_ready,
    make_bodies,
    start_service,
    write_lua,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _busiest_worker(pid: int, since: dict[int, float]) -> int:
    """The child of ``pid`` that used the most CPU since ``since`` (a worker, not a helper)."""
    now = _tree_cpu(pid)
    return max((p for p in now if p != pid), key=lambda p: now[p] - since.get(p, 0.0))


def _record(pid: int, seconds: int, out: Path) -> None:
    """``out`` (.svg flame graph) and, sampled at the same time, ``out`` with .txt: the collapsed
    stacks (one line per distinct stack with its sample count), for ``summary``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    runs = [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                "200",
                "--nonblocking",
                "--output",
                str(path),
                "--format",
                fmt,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for path, fmt in ((out, "flamegraph"), (out.with_suffix(".txt"), "raw"))
    ]
    for r in runs:
        r.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--tag", default="after")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument(
        "--code", type=Path, default=ROOT, help="source tree to serve (e.g. a worktree of main)"
    )
    args = ap.parse_args()
    from serve_data import bench_bundle

    bundle = bench_bundle(args.items, args.cache, nprobe=args.nprobe)
    tmp = args.cache / "run"
    tmp.mkdir(parents=True, exist_ok=True)
    lua = write_lua(make_bodies(bundle, args.items), tmp / "bodies.lua")
    port = _free_port()
    proc = start_service(bundle, port, 2, tmp, code=args.code)
    try:
        _wait_ready(port, proc)
        cpu0 = _tree_cpu(proc.pid)
        url = f"http://127.0.0.1:{port}"
        load = subprocess.Popen(
            ["wrk", "-t2", "-c16", f"-d{args.seconds + 4}s", "-s", str(lua), url],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(2)
        worker = _busiest_worker(proc.pid, cpu0)
        _record(worker, args.seconds, args.out / f"profile-{args.tag}-retrieve.svg")
        load.wait()

        from csmf.bundle import UserSnapshot

        users = tmp / "batch_users.json"
        ids = UserSnapshot.load(bundle / "users.parquet", "user_id").ids[:20000]
        users.write_text(__import__("json").dumps(ids))
        client = [sys.executable, "-c", BATCH_CLIENT, str(port), str(users), "500"]
        clients = [
            subprocess.Popen([*client, str(args.seconds + 5), "10"], stdout=subprocess.DEVNULL)
            for _ in range(2)
        ]
        cpu0 = _tree_cpu(proc.pid)
        time.sleep(3)  # the clients' connections may both land on one worker: profile that one
        worker = _busiest_worker(proc.pid, cpu0)
        _record(worker, args.seconds, args.out / f"profile-{args.tag}-batch.svg")
        for c in clients:
            c.wait()
    finally:
        _stop(proc)
    print(f"wrote {args.out}/profile-{args.tag}-{{retrieve,batch}}.svg")


if __name__ == "__main__":
    main()
