"""Load benchmark of the retrieval service, loopback only, bounded in time.

    .venv/bin/python bench/serve.py --items 100000            # then --items 1000000

For a synthetic catalogue of N items (bench/serve_data.py: real builder, IVF index, recall
checked on weighted queries) it measures, in one run:

1. in-process cost of the two things a retrieval cannot avoid: encoding one user (numpy tower)
   and one raw FAISS search (k=50, one OpenMP thread), CPU µs each, in separate loops and
   interleaved per request (encode, then its search); the interleaved cost is the baseline,
   because separate loops keep each step's data cache-hot, which no request enjoys;
2. a bare FastAPI endpoint (bench/serve_bare.py) under the same load: server CPU µs/request;
   a hand-written FastAPI + encoder + FAISS endpoint (bench/serve_handwritten.py), what a team
   would write instead of the service: same bodies, same results, none of the service's extras;
   and the floor endpoint (bench/serve_floor.py): uvicorn calling one bare ASGI function that
   does the same lookup, encode, search and item JSON, the least any server on this stack can do
   for these results (a parity check posts 300 bodies to all three and compares the items);
3. the service (`csmf serve --workers W`) under wrk: 16 connections, 5,000 varied bodies
   (known/unknown users, inline histories, exclusions, scenario or explicit weights), k=50:
   requests/s, p50/p90/p99, non-2xx, server CPU µs/request, and the ratios
   service CPU / (bare + encode + search) and service CPU / hand-written endpoint CPU;
4. the batch endpoint from two separate client processes: users/s and server CPU per user,
   beside its ceiling: a batched encode and FAISS search alone, in one process per worker.

Bare and service run side by side and are loaded at the same time in each of ``--rounds`` rounds
(medians kept), so a neighbour's job starting mid-run hits both alike (``--sequential``: one after
the other). ``--before REF`` serves that commit too (a git worktree under ``--cache``; repeat it
for several), measured in the same rounds: before and after side by side in one run. Option rows price ``explain``,
``exclude_seen``, ``exclude`` and ``filter`` one at a time against the plainest request.

``--onnx`` builds the bundle with ``--onnx`` and adds the service at this tree with
``CSMF_ENCODER=onnx`` to every round, option row and batch run, and an in-process table of the
user tower run three ways (numpy, torch eager, onnxruntime: µs per user, one and 500 per call).

Server CPU is read from /proc (utime+stime of the uvicorn processes), so the load generator's own
CPU is excluded. The machine is shared: the 1-minute load average before and after is recorded.
Results go to bench/results/serve.md (one section per catalogue size, replaced on rerun) and
serve-<N>.json beside it.

The parts, one module each: serve_bodies.py (request bodies, the wrk script), serve_servers.py
(the processes and their CPU), serve_load.py (wrk, batch clients, parity, medians),
serve_work.py (in-process baseline, batch ceiling, encoders), serve_report.py (the results
page); serve_data.py builds the bundle. Header and tables come from csmf/results.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Same BLAS threading as `csmf serve` (see service/cli.py), before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from serve_bodies import OPTIONS, make_bodies, option_bodies, write_lua  # noqa: E402
from serve_load import batch, median_run, parity, round_ratio, wrk  # noqa: E402
from serve_report import section, write_report  # noqa: E402
from serve_servers import (  # noqa: E402
    BENCH,
    ROOT,
    free_port,
    head,
    start_bare,
    start_bench_server,
    start_service,
    stop,
    wait_ready,
    worktree,
)
from serve_work import (  # noqa: E402
    batch_ceiling,
    encoders,
    in_process,
    in_process_parallel,
    work_us,
)

from csmf.bundle import read_manifest  # noqa: E402
from csmf.results import finish_run, run_info, script_command  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--nprobe", type=int, default=32, help="IVF lists probed (recall vs latency)")
    ap.add_argument(
        "--tune", action="store_true", help="let the builder lower nprobe (csmf build-index --tune)"
    )
    ap.add_argument("--duration", type=int, default=8, help="seconds of measured load per round")
    ap.add_argument(
        "--rounds", type=int, default=3, help="bare and service measured alternately, medians kept"
    )
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (bare and service)")
    ap.add_argument(
        "--single", action="store_true", help="also measure a 1-worker service (multiprocess check)"
    )
    ap.add_argument(
        "--before",
        metavar="GIT_REF",
        action="append",
        default=[],
        help="also serve this commit (a git worktree under --cache) and measure it in the same "
        "rounds, option rows and batch run: before/after side by side (repeatable; the first "
        "one's builder makes the bundle)",
    )
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="also serve this tree with CSMF_ENCODER=onnx (bundle built with --onnx) in the same "
        "rounds, and compare the encoders in process",
    )
    ap.add_argument(
        "--option-duration", type=int, default=4, help="seconds of load per option row (0: none)"
    )
    ap.add_argument("--option-rounds", type=int, default=3, help="rounds of the option rows")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="load one server at a time (default: bare and the services under load together, "
        "so a shared machine's changing load hits them alike; CPU per request is per server)",
    )
    ap.add_argument(
        "--parity-bodies", type=int, default=1000, help="mixed bodies of the parity check"
    )
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "serve.md")
    return ap.parse_args()


def services(
    args: argparse.Namespace, at: str
) -> tuple[dict[str, tuple[Path, dict[str, str], Path]], Path, str]:
    """The services to measure, name → (source tree, CSMF_* settings, bundle); the bundle every
    other server answers from; the short hashes of ``--before`` ('' without it).

    Everything answers from one bundle, built by the first ``--before``'s own builder when given
    (an older commit may not read a newer builder's manifest; newer code reads older ones). The
    onnxruntime service needs user_tower.onnx, so it answers from this tree's bundle built with
    ``--onnx`` (same data, seeds and model; the parity check compares its results)."""
    from serve_data import bench_bundle, bench_bundle_in

    kw = {"nprobe": args.nprobe, "tune": args.tune}
    out: dict[str, tuple[Path, dict[str, str], Path]] = {}
    shas = []
    shared = None
    for ref in args.before:
        path, sha = worktree(ref, args.cache)
        if shared is None:
            shared = bench_bundle_in(path, args.items, args.cache / f"built-by-{sha}", **kw)
        out[f"service before ({sha})"] = (path, {}, shared)
        shas.append(sha)
    if shared is None:
        shared = bench_bundle(args.items, args.cache, **kw, onnx=args.onnx)
    out[f"service at {at}"] = (ROOT, {}, shared)
    if args.onnx:
        onnx = bench_bundle(args.items, args.cache, **kw, onnx=True)
        out[f"service at {at}, onnxruntime encoder"] = (ROOT, {"encoder": "onnx"}, onnx)
    before = ", ".join(shas)
    return out, shared, before


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get update && apt-get install -y wrk")
    run = run_info(ROOT, ("service", "csmf"))
    t0 = time.time()
    at = head()
    codes, bundle, before = services(args, at)
    manifest = read_manifest(bundle)
    print(f"bundles ready in {time.time() - t0:.0f}s: {bundle}", flush=True)
    tmp = args.cache / "run"
    tmp.mkdir(parents=True, exist_ok=True)
    bodies = make_bodies(bundle, args.items)
    lua = write_lua(bodies, tmp / "bodies.lua")
    w = args.workers

    base = in_process(bundle, bodies)
    print(f"in process, alone: {base}", flush=True)
    if w > 1:
        loaded = in_process_parallel(bundle, bodies, w)
        print(f"in process, {w} at once: {loaded}", flush=True)
        base = {**loaded, "alone": base, "parallel": w}
    ceiling = batch_ceiling(bundle, w, args.batch_size, 10)
    print(f"batch ceiling: {ceiling}", flush=True)
    onnx_name = f"service at {at}, onnxruntime encoder"
    enc = encoders(codes[onnx_name][2], bodies) if onnx_name in codes else None
    print(f"encoders: {enc}", flush=True)

    # Bare and the services side by side (an idle uvicorn costs nothing), measured alternately so
    # a change in the machine's load hits all alike; the ratio is taken per round.
    bare_p = start_bare(bare_port := free_port(), w)
    hand_p = start_bench_server("serve_handwritten.py", bundle, hand_port := free_port(), w)
    floor_p = start_bench_server("serve_floor.py", bundle, floor_port := free_port(), w)
    procs = {name: (port := free_port(), start_service(b, port, w, tmp, code, **settings))
             for name, (code, settings, b) in codes.items()}  # fmt: skip
    refs = {
        "bare": (bare_port, bare_p),
        "hand": (hand_port, hand_p),
        "floor": (floor_port, floor_p),
    }
    runs: dict[str, list[dict]] = {name: [] for name in (*refs, *codes)}
    options: dict[str, dict[str, dict]] = {}
    batch_res: dict[str, dict] = {}
    try:
        for port, proc in (*refs.values(), *procs.values()):
            wait_ready(port, proc)
        # The services on the mixed bodies plus explain and filter ones; the bench servers
        # (which implement neither) on the mixed ones.
        ports = {name: port for name, (port, _) in procs.items()}
        extra = option_bodies(bundle, args.items, "explain")[:100]
        extra += option_bodies(bundle, args.items, "filter")[:100]
        same = parity(ports, bodies[: args.parity_bodies] + extra)
        first = next(iter(ports))
        bench_same = parity(
            {first: ports[first], "hand-written": hand_port, "floor": floor_port},
            bodies[: args.parity_bodies],
        )
        print(f"parity: {same}; bench servers: {bench_same}", flush=True)

        # One round: every server under the same load, either at the same time (default: a
        # neighbour's job hits all of them alike) or one after the other (--sequential).
        def measure(targets: dict[str, tuple[int, Path, int]], seconds: int) -> dict[str, dict]:
            if args.sequential:
                return {n: wrk(p, l_, seconds, args.connections, pid)
                        for n, (p, l_, pid) in targets.items()}  # fmt: skip
            with ThreadPoolExecutor(len(targets)) as ex:
                futs = {n: ex.submit(wrk, p, l_, seconds, args.connections, pid)
                        for n, (p, l_, pid) in targets.items()}  # fmt: skip
                return {n: f.result() for n, f in futs.items()}

        for i in range(args.rounds):
            targets = {n: (port, lua, proc.pid) for n, (port, proc) in {**refs, **procs}.items()}
            for name, r in measure(targets, args.duration).items():
                runs[name].append(r)
                print(f"round {i}: {name} {r}", flush=True)
        if args.option_duration > 0:
            options = option_rows(args, bundle, tmp, procs, measure)
        with ThreadPoolExecutor(1 if args.sequential else len(procs)) as ex:
            futs = {
                name: ex.submit(batch, port, bundle, args.batch_size, 2, 10, 10,
                                tmp / f"batch-{port}", proc.pid)
                for name, (port, proc) in procs.items()
            }  # fmt: skip
            for name, f in futs.items():
                batch_res[name] = f.result()
                print(f"batch {name}: {batch_res[name]}", flush=True)
    finally:
        for _, proc in (*refs.values(), *procs.values()):
            stop(proc)
    bare, hand, floor, table_runs = summarize(runs, codes, base, w)
    if args.single:
        table_runs.update(single_worker(args, bundle, lua, tmp, bare, base, at))
    meta = {
        "run": finish_run(run),
        "command": script_command(__file__),
        "baseline_us": bare["cpu_us_per_req"] + work_us(base),
        "rounds": args.rounds,
        "duration": args.duration,
        "option_duration": args.option_duration,
        "option_rounds": args.option_rounds,
        "sequential": args.sequential,
        "before": before,
        "head": at,
        "parity": same,
        "bench_parity": bench_same,
        "batch_ceiling": ceiling,
        "encoders": enc,
    }
    text = section(
        args.items, manifest, base, bare, table_runs, batch_res, options, meta, hand, floor
    )
    doc = {"command": meta["command"], "meta": meta, "in_process": base, "bare": bare,
           "hand": hand, "floor": floor, "services": table_runs, "batch": batch_res,
           "options": options}  # fmt: skip
    js = write_report(args.out, args.items, text, doc)
    print(f"wrote {args.out} and {js}")


def option_rows(args, bundle: Path, tmp: Path, procs: dict, measure) -> dict[str, dict[str, dict]]:
    """Each option's bodies against every service: options interleaved, servers together,
    medians over rounds."""
    luas = {
        opt: write_lua(option_bodies(bundle, args.items, opt), tmp / f"opt-{opt}.lua")
        for opt in OPTIONS
    }
    got: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.option_rounds):
        for opt in OPTIONS:
            targets = {name: (port, luas[opt], proc.pid) for name, (port, proc) in procs.items()}
            for name, r in measure(targets, args.option_duration).items():
                got.setdefault((opt, name.replace("service ", "")), []).append(r)
                print(f"option {opt} {name}: {r}", flush=True)
    options: dict[str, dict[str, dict]] = {}
    for (opt, short), rs in got.items():
        options.setdefault(opt, {})[short] = median_run(rs)
    return options


def summarize(runs: dict[str, list[dict]], codes: dict, base: dict, w: int):
    """(bare, hand-written, floor, service rows): medians over rounds; each ratio the median of
    the per-round ratios."""
    bare = median_run(runs["bare"])
    baseline = bare["cpu_us_per_req"] + work_us(base)
    hand = median_run(runs["hand"])
    hand["ratio"] = hand["cpu_us_per_req"] / baseline
    floor = median_run(runs["floor"])
    floor["ratio"] = floor["cpu_us_per_req"] / baseline
    hand["floor_ratio"] = round_ratio(runs["hand"], runs["floor"])
    rows = {}
    for name in codes:
        per_round = [
            r["cpu_us_per_req"] / (b["cpu_us_per_req"] + work_us(base))
            for r, b in zip(runs[name], runs["bare"], strict=True)
        ]
        rows[f"{name}, {w} workers"] = {
            **median_run(runs[name]),
            "ratio": float(np.median(per_round)),
            "hand_ratio": round_ratio(runs[name], runs["hand"]),
            "floor_ratio": round_ratio(runs[name], runs["floor"]),
        }
    return bare, hand, floor, rows


def single_worker(args, bundle: Path, lua: Path, tmp: Path, bare: dict, base: dict, at: str):
    port = free_port()
    proc = start_service(bundle, port, 1, tmp)
    try:
        wait_ready(port, proc)
        one = median_run([wrk(port, lua, args.duration, args.connections, proc.pid)])
    finally:
        stop(proc)
    alone = base.get("alone", base)  # one worker: the single-process measurement
    one["ratio"] = one["cpu_us_per_req"] / (bare["cpu_us_per_req"] + work_us(alone))
    print(f"service x1: {one}", flush=True)
    return {f"service at {at}, 1 worker (no multiprocess metrics)": one}


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
