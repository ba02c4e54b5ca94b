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
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from serve_bodies import make_bodies, write_lua
from serve_load import BATCH_CLIENT
from serve_servers import free_port, start_service, stop, tree_cpu, wait_ready

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _busiest_worker(pid: int, since: dict[int, float]) -> int:
    """The child of ``pid`` that used the most CPU since ``since`` (a worker, not a helper)."""
    now = tree_cpu(pid)
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


ANCHORS = {"retrieve": "_fast_retrieve (main.py)", "batch": "retrieve_batch.<locals>.work"}


def summary(raw: Path, anchor: str, top: int = 22) -> list[list[str]]:
    """Rows (% of the request, % of samples, self %, frame) of the ``top`` frames under
    ``anchor`` (the request's outermost frame of ours) in a collapsed-stack file, by inclusive
    share (a frame counted once per stack)."""
    inc: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = [
            re.sub(r" \(.*?(?:site-packages|lib/python3\.\d+|wt-[\w-]+|hotpath-base)/", " (", f)
            for f in stack.split(";")
        ]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        total += int(n)
        if not any(f.startswith(anchor) for f in frames):
            continue
        below = frames[next(i for i, f in enumerate(frames) if f.startswith(anchor)) :]
        for f in set(below):
            inc[f] += int(n)
        own[frames[-1]] += int(n)
    request = max(inc.values(), default=1)
    return [
        [
            f"{100 * c / request:.1f}",
            f"{100 * c / total:.1f}",
            f"{100 * own[f] / total:.1f}",
            f"`{f}`",
        ]
        for f, c in sorted(inc.items(), key=lambda fc: (-fc[1], fc[0]))[:top]  # ties by name
    ]


def write_summary(stem: Path, tags: list[str]) -> None:
    """``stem``.md / .json: each profile's top frames under the request, before and after."""
    from csmf.results import script_command, table, write_results

    lines = [
        "From `python bench/serve_profile.py --items 1000000 --tag TAG` (py-spy, 200 Hz, the "
        "busiest worker under wrk / two batch clients, 1,000,000 items; `before` served a git "
        "worktree of the base commit with `--code`). Wall-clock samples of threads that are not "
        "idle: a thread preempted inside a system call (the response-header write that wakes the "
        "client) is counted there, so on a loaded machine `RequestResponseCycle.send` is mostly "
        "time waiting for a core, not CPU work; bench/results/serve.md has the CPU accounting. "
        "Flame graphs: " + ", ".join(f"`profile-{t}-{p}.svg`" for t in tags for p in ANCHORS),
        "",
    ]
    head = ["% of the request", "% of samples", "self % of samples", "frame"]
    profiles = {}
    for path, anchor in ANCHORS.items():
        for tag in tags:
            raw = stem.parent / f"profile-{tag}-{path}.txt"
            if raw.exists():
                profiles[f"{path}, {tag}"] = rows = summary(raw, anchor)
                lines += [f"## {path}, {tag}", ""]
                lines += table(head, rows, "rrrl") + [""]
    doc = {"tags": tags, "columns": head, "profiles": profiles}
    write_results(stem, "Serving profiles", script_command(__file__), lines, doc)


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
    ap.add_argument(
        "--summarise",
        metavar="TAG",
        nargs="+",
        help="only write bench/results/profile.md from the recorded profiles of these tags",
    )
    args = ap.parse_args()
    if args.summarise:
        write_summary(args.out / "profile", args.summarise)
        return
    from serve_data import bench_bundle

    bundle = bench_bundle(args.items, args.cache, nprobe=args.nprobe)
    tmp = args.cache / "run"
    tmp.mkdir(parents=True, exist_ok=True)
    lua = write_lua(make_bodies(bundle, args.items), tmp / "bodies.lua")
    port = free_port()
    proc = start_service(bundle, port, 2, tmp, code=args.code)
    try:
        wait_ready(port, proc)
        cpu0 = tree_cpu(proc.pid)
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
        cpu0 = tree_cpu(proc.pid)
        time.sleep(3)  # the clients' connections may both land on one worker: profile that one
        worker = _busiest_worker(proc.pid, cpu0)
        _record(worker, args.seconds, args.out / f"profile-{args.tag}-batch.svg")
        for c in clients:
            c.wait()
    finally:
        stop(proc)
    print(f"wrote {args.out}/profile-{args.tag}-{{retrieve,batch}}.svg")


if __name__ == "__main__":
    main()
