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
the other). ``--before REF`` serves that commit too (a git worktree under ``--cache``), measured
in the same rounds: before and after side by side in one run. Option rows price ``explain``,
``exclude_seen``, ``exclude`` and ``filter`` one at a time against the plainest request.

Server CPU is read from /proc (utime+stime of the uvicorn processes), so the load generator's own
CPU is excluded. The machine is shared: the 1-minute load average before and after is recorded.
Results go to bench/results/serve.md (one section per catalogue size, replaced on rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Same BLAS threading as `csmf serve` (see service/cli.py), before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from csmf.atomic import atomic_write_text  # noqa: E402
from csmf.bundle import Manifest, read_manifest  # noqa: E402
from csmf.results import script_command, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user+sys) of ``pid`` and of each of its children, by pid."""
    pids = [pid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            continue
    return out


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- request bodies ---------------------------------------------------------------------------------


def make_bodies(
    bundle: Path, n_items: int, count: int = 5000, k: int = 50, seed: int = 0
) -> list[str]:
    from csmf.bundle import UserSnapshot

    users = UserSnapshot.load(bundle / "users.parquet", "user_id").ids
    rng = random.Random(seed)
    out = []
    for n in range(count):
        b: dict = {"user_id": rng.choice(users), "k": k}
        if rng.random() < 0.1:
            b["user_id"] = f"new-user-{n}"  # unknown: cold start unless a history follows
        if rng.random() < 0.1:
            b["history"] = [f"i{rng.randrange(n_items)}" for _ in range(10)]
        if rng.random() < 0.4:
            b["weights"] = {
                o: round(rng.uniform(0, 2), 2) for o in ("exposure", "click", "conversion")
            }
        if rng.random() < 0.1:
            b["exclude"] = [f"i{rng.randrange(n_items)}" for _ in range(5)]
            b["exclude_seen"] = True
        out.append(json.dumps(b))
    return out


OPTIONS = ("plain", "explain", "exclude_seen", "exclude", "filter", "filter_narrow")
OPTION_NOTES = {
    "plain": "known users, scenario `default`, k=50, `exclude_seen: false`",
    "explain": "plain + `explain: true` (per-objective scores of every item)",
    "exclude_seen": "plain with `exclude_seen` at its default (true): the stored history "
    "(~40 items) never returned",
    "exclude": "plain + `exclude`: 5 item ids",
    "filter": "plain + `filter`: `topic in [500 topics]` (~50 % of items), 8 distinct filters "
    "(cached after first use)",
    "filter_narrow": "plain + `filter`: `topic in [50 topics]` (~5 % of items: IVF probes "
    "nprobe / 0.05 lists to see as many allowed items), 8 distinct filters",
}


def option_bodies(
    bundle: Path, n_items: int, option: str, count: int = 2000, k: int = 50, seed: int = 1
) -> list[str]:
    """Bodies that differ from the plainest request by one option, to price each option."""
    from csmf.bundle import UserSnapshot

    users = UserSnapshot.load(bundle / "users.parquet", "user_id").ids
    rng = random.Random(seed)
    topics = [str(t) for t in range(1000)]  # bench/serve_data.py: items have 1,000 topics
    share = {"filter": 500, "filter_narrow": 50}.get(option, 0)
    filters = [{"field": "topic", "in": rng.sample(topics, share)} for _ in range(8)]
    out = []
    for _ in range(count):
        b: dict = {"user_id": rng.choice(users), "k": k}
        if option != "exclude_seen":
            b["exclude_seen"] = False
        if option == "explain":
            b["explain"] = True
        elif option == "exclude":
            b["exclude"] = [f"i{rng.randrange(n_items)}" for _ in range(5)]
        elif option in ("filter", "filter_narrow"):
            b["filter"] = rng.choice(filters)
        out.append(json.dumps(b))
    return out


def write_lua(bodies: list[str], path: Path) -> Path:
    lines = ["local bodies = {"] + [f"  {json.dumps(b)}," for b in bodies] + ["}"]
    lines += [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        "local counter = 0",
        "function setup(thread)",
        '  thread:set("tid", counter)',
        "  counter = counter + 1",
        "end",
        "function init(args)",
        "  i = (tid or 0) * 1777",  # threads start at different bodies
        "end",
        "request = function()",
        "  i = i + 1",
        '  return wrk.format(nil, "/v1/retrieve", nil, bodies[(i % #bodies) + 1])',
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- measurements -------------------------------------------------------------------------------------


def _in_processes(target, args: list[tuple]) -> list[dict]:
    """``target(*args[i], barrier, out)`` in one spawned process per ``args`` entry; each loads,
    waits at the shared barrier (so the measured parts overlap) and puts one dict on ``out``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(args)), ctx.Queue()
    ps = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args]
    for p in ps:
        p.start()
    res = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return res


def in_process_parallel(bundle_path: Path, bodies: list[str], procs: int) -> dict:
    """``in_process`` in ``procs`` processes at once (started together after loading): the cost
    of encode + search when every core is busy, as inside a loaded multi-worker server."""
    res = _in_processes(_in_process_child, [(bundle_path, bodies[i::procs]) for i in range(procs)])
    return {k: sum(r[k] for r in res) / procs for k in res[0]}


def _in_process_child(bundle_path: Path, bodies: list[str], barrier, out) -> None:
    out.put(in_process(bundle_path, bodies, barrier=barrier))


def in_process(bundle_path: Path, bodies: list[str], n: int = 3000, barrier=None) -> dict:
    """CPU µs of encode (one user) and raw search (one query, k=50) with varied users/weights."""
    import faiss

    from csmf.bundle import load_bundle

    faiss.omp_set_num_threads(1)
    b = load_bundle(bundle_path, verify=False)
    reqs = [json.loads(x) for x in bodies[:n]]
    n = len(reqs)
    users = []
    for r in reqs:
        got = b.users.get(r["user_id"])
        row, hist = got if got else ({"user_id": r["user_id"]}, [])
        users.append((row, r.get("history", hist)))
    scales = [b.scale(r.get("weights", [1.0, 1.8, 1.2])) for r in reqs]
    b.encoder.encode([users[0][0]], [users[0][1]])
    if barrier is not None:
        barrier.wait()
    reps = 3  # ~1 s of each at 1M items, so parallel copies overlap
    t = time.process_time()
    for _ in range(reps):
        e = [b.encoder.encode([row], [hist]) for row, hist in users]
    encode = (time.process_time() - t) / (n * reps)
    q = [x * s for x, s in zip(e, scales, strict=True)]
    b.index.search(q[0], 50)
    t = time.process_time()
    for _ in range(reps):
        for x in q:
            b.index.search(x, 50)
    search = (time.process_time() - t) / (n * reps)
    # The same work in the order a request does it: encode user i, search its query, next user.
    # Separate loops keep each one's data cache-hot (the encoder's weights, the coarse
    # centroids); interleaved, each search's scan of the inverted lists (~2 MB at 1M items)
    # evicts what the next encode needs, as it does in the server.
    t = time.process_time()
    for _ in range(reps):
        for (row, hist), s in zip(users, scales, strict=True):
            b.index.search(b.encoder.encode([row], [hist]) * s, 50)
    interleaved = (time.process_time() - t) / (n * reps)
    return {"encode_us": encode * 1e6, "search_us": search * 1e6, "request_us": interleaved * 1e6}


def work_us(base: dict) -> float:
    """In-process encode + raw search per request, as the ratio's denominator uses it (the
    interleaved measurement; see ``in_process``)."""
    return base["request_us"]


def wrk(port: int, lua: Path, duration: int, connections: int, pid: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    subprocess.run(  # warm-up: connections, caches, FAISS lists in memory
        ["wrk", "-t2", f"-c{connections}", "-d2s", "-s", str(lua), url],
        capture_output=True,
        check=True,
    )
    cpu0 = _tree_cpu(pid)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu1 = _tree_cpu(pid)
    per = sorted((cpu1[p] - cpu0.get(p, 0.0) for p in cpu1 if p != pid), reverse=True)
    per = [c for c in per if c > 0.01 * max(sum(per), 1e-9)]  # workers, not helper processes
    cpu = sum(cpu1.values()) - sum(cpu0.values())
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)

    def pct(p: str) -> float:
        v, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out).groups()
        return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": pct("50"),
        "p90_ms": pct("90"),
        "p99_ms": pct("99"),
        "requests": reqs,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
        "cpu_us_per_req": cpu / reqs * 1e6,
        "server_cores": cpu / duration,
        # how evenly the kernel spread the connections: CPU share of each worker process
        "worker_split": "/".join(f"{100 * c / max(sum(per), 1e-9):.0f}" for c in per)
        if len(per) > 1
        else "",
    }


BATCH_CLIENT = r"""
import json, sys, time, random, httpx
port, size, duration, k = int(sys.argv[1]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
users = json.loads(open(sys.argv[2]).read())
rng = random.Random(1)
done = 0
with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
    c.post("/v1/retrieve/batch", json={"users": [{"user_id": u} for u in users[:size]], "k": k})
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration:
        body = {"users": [{"user_id": u} for u in rng.sample(users, size)], "k": k}
        r = c.post("/v1/retrieve/batch", json=body)
        assert r.status_code == 200, r.text
        done += size
    print(json.dumps({"users": done, "seconds": time.perf_counter() - t0}))
"""


def batch(
    port: int,
    bundle: Path,
    size: int,
    clients: int,
    duration: float,
    k: int,
    tmp: Path,
    pid: int,
) -> dict:
    """Users/s of ``clients`` batch clients over ``duration`` s, and the server's (``pid`` and its
    workers) CPU per user."""
    from csmf.bundle import UserSnapshot

    tmp.mkdir(parents=True, exist_ok=True)
    users = tmp / "batch_users.json"
    users.write_text(json.dumps(UserSnapshot.load(bundle / "users.parquet", "user_id").ids[:20000]))
    cpu0 = sum(_tree_cpu(pid).values())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                BATCH_CLIENT,
                str(port),
                str(users),
                str(size),
                str(duration),
                str(k),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    res = [json.loads(p.communicate()[0]) for p in procs]
    cpu = sum(_tree_cpu(pid).values()) - cpu0
    users = sum(r["users"] for r in res) + size * clients  # and each client's warm-up call
    return {
        "users_per_s": sum(r["users"] / r["seconds"] for r in res),
        "cpu_us_per_user": cpu / users * 1e6,
        "batch_size": size,
        "clients": clients,
        "k": k,
    }


def start_service(
    bundle: Path, port: int, workers: int, tmp: Path, code: Path = ROOT, **settings: str
) -> subprocess.Popen:
    """``csmf serve`` from the source tree ``code`` (default: this one; bench/serve.py --before
    passes a git worktree of an earlier commit), which is its working directory and PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CSMF_", "PROMETHEUS_"))}
    env.update({f"CSMF_{k.upper()}": v for k, v in settings.items()})
    env["CSMF_SCENARIOS_FILE"] = str(tmp / f"scenarios-{port}.json")
    env["CSMF_MAX_BATCH"] = "2000"
    env.setdefault("CSMF_VERIFY_BUNDLE", "false")  # checked when built; startup is not measured
    env["PYTHONPATH"] = str(code)
    csmf = [sys.executable, "-m", "csmf.cli", "serve", "--bundle", str(bundle)]
    args = csmf + ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    return subprocess.Popen(
        args, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def start_bare(port: int, workers: int) -> subprocess.Popen:
    args = [sys.executable, "serve_bare.py", str(port), str(workers)]
    return subprocess.Popen(args, cwd=BENCH, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_bench_server(script: str, bundle: Path, port: int, workers: int) -> subprocess.Popen:
    """A bench/ server on ``bundle``: serve_handwritten.py (FastAPI + encoder + FAISS, what a team
    would write instead) or serve_floor.py (bare ASGI + the same work)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, script, str(bundle), str(port), str(workers)]
    return subprocess.Popen(
        args, cwd=BENCH, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def parity(ports: dict[str, int], bodies: list[str]) -> dict:
    """POST each body to every server; count the bodies whose item ids differ from the first
    server's, or whose scores differ by more than 1e-4 (float32 sums in a different order)."""
    import httpx

    first, *others = ports
    diffs = {name: 0 for name in others}
    with httpx.Client(timeout=30) as c:
        for body in bodies:
            got = {}
            for name, port in ports.items():
                r = c.post(f"http://127.0.0.1:{port}/v1/retrieve", content=body)
                r.raise_for_status()
                got[name] = [(x["item_id"], x["score"]) for x in r.json()["items"]]
            for name in others:
                a, b = got[first], got[name]
                same = [i for i, _ in a] == [i for i, _ in b] and all(
                    abs(x - y) <= 1e-4 * max(1.0, abs(x))
                    for (_, x), (_, y) in zip(a, b, strict=True)
                )
                diffs[name] += not same
    return {"bodies": len(bodies), "reference": first, "differences": diffs}


def batch_ceiling(bundle_path: Path, procs: int, size: int, k: int, calls: int = 12) -> dict:
    """Users/s of the batch endpoint's unavoidable work alone — one batched encode of ``size``
    known users and one batched FAISS search (k, the service's k + |seen| fetch, one OpenMP
    thread) — in ``procs`` processes at once, summed: no server can answer faster on this box."""
    res = _in_processes(_batch_child, [(bundle_path, size, k, calls, i) for i in range(procs)])
    return {
        "users_per_s": sum(r["users_per_s"] for r in res),
        "search_share": float(np.mean([r["search_share"] for r in res])),
        "procs": procs,
        "size": size,
        "k": k,
    }


def _batch_child(bundle_path: Path, size: int, k: int, calls: int, seed: int, barrier, out):
    import faiss

    from csmf.bundle import load_bundle

    faiss.omp_set_num_threads(1)
    b = load_bundle(bundle_path, verify=False)
    ids = b.users.ids
    rng = random.Random(seed)
    scale = b.scale([1.0, 1.8, 1.2])
    barrier.wait()
    enc = search = 0.0
    for _ in range(calls):
        users = [b.users.get(u) for u in rng.sample(ids, size)]
        t = time.process_time()
        e = b.encoder.encode([r for r, _ in users], [h for _, h in users])
        t1 = time.process_time()
        fetch = k + max(len(h) for _, h in users)  # exclude_seen's fetch, as the service does
        b.search(e * scale, fetch)
        t2 = time.process_time()
        enc, search = enc + t1 - t, search + t2 - t1
    out.put({"users_per_s": size * calls / (enc + search), "search_share": search / (enc + search)})


# -- report ---------------------------------------------------------------------------------------------


def section(
    n: int,
    manifest: Manifest,
    base: dict,
    bare: dict,
    runs: dict,
    batch_res: dict,
    options: dict,
    meta: dict,
    hand: dict | None = None,
    floor: dict | None = None,
) -> str:
    rc, idx = manifest.recall_check, manifest.index
    tuned = " (nprobe tuned)" if idx.tuning else ""
    lines = [
        f"## {n:,} items{tuned}",
        "",
        f"Run {meta['when']}, command `{meta['command']}`; load average {meta['load_before']:.2f} "
        f"before, {meta['load_after']:.2f} after, on 2 cores shared with other jobs (absolute "
        "rates are depressed and vary ±30 % run to run; compare rows within this section). "
        f"Medians of {meta['rounds']} rounds of {meta['duration']} s; bare, "
        + (f"the service before ({meta['before']}) and " if meta["before"] else "")
        + f"the service at {meta['head']} "
        + (
            "measured one after the other"
            if meta["sequential"]
            else "under load at the same "
            "time (each server its own wrk; CPU per request is each server's own), so the "
            "machine's changing load hits them alike"
        )
        + "; the ratio is service CPU / (bare + interleaved encode+search) per round, median"
        + (
            "; the hand-written ratio is service CPU / the hand-written endpoint's CPU "
            "(bench/serve_handwritten.py: FastAPI + the same encoder and index, same bodies and "
            "results, none of the service's scenarios, request ids, metrics, named errors), per "
            "round, median."
            if hand
            else "."
        ),
        "",
        f"Bundle: {idx.type} {idx.build_params} "
        f"{idx.search_params}, {manifest.dim} dims, slices {list(manifest.slice_sizes)}; "
        f"ANN recall@{rc.k} on weighted queries: min {rc.min_recall:.3f} over "
        + ", ".join(f"{tuple(x.weights)}: {x.recall:.3f}" for x in rc.by_weights),
        "",
        f"In process (one thread): encode {base['encode_us']:.0f} µs/user, raw FAISS search "
        f"{base['search_us']:.0f} µs/query (k=50)"
        + (
            f", measured in {base['parallel']} processes at once like the workers (alone: encode "
            f"{base['alone']['encode_us']:.0f}, search {base['alone']['search_us']:.0f})"
            if "parallel" in base
            else ""
        )
        + f"; interleaved per request (encode, then its search, as a request does them): "
        f"{base['request_us']:.0f} µs (alone: {base.get('alone', base)['request_us']:.0f}). "
        f"Bare endpoint (same stack, bodies and response size, no work): "
        f"{bare['cpu_us_per_req']:.0f} µs server CPU/request at {bare['rps']:.0f} req/s "
        f"(p99 {bare['p99_ms']:.2f} ms). Baseline = bare + interleaved encode+search = "
        f"{meta['baseline_us']:.0f} µs (with the separate-loop numbers instead: "
        f"{bare['cpu_us_per_req'] + base['encode_us'] + base['search_us']:.0f} µs, the last column).",
        "",
    ]
    if floor:
        lines += [
            "The floor endpoint (bench/serve_floor.py) is the least a Python server on this stack "
            "can do and return the same results: uvicorn calling one bare ASGI function, orjson "
            "in, the same lookup, encode and search, the service's pre-serialised item JSON out; "
            "no framework, validation, metrics or request ids. Its ratio to the baseline is how "
            "far `bare + encode + search` measured in pieces sits below any server that does "
            "the work; the service's ratio to it is the price of everything the service adds.",
            "",
        ]
    if meta.get("parity"):
        p_ = meta["parity"]
        lines += [
            f"Same results: {p_['bodies']} of the bodies posted to every server, items and scores "
            f"compared with {p_['reference']}'s: "
            + ", ".join(f"{name} {d} differences" for name, d in p_["differences"].items())
            + ".",
            "",
        ]
    lines += [
        "Mixed bodies (5,000: 10 % unknown users, 10 % inline histories, 40 % explicit weights, "
        "10 % `exclude`; `exclude_seen` at its default), 16 connections, k=50:",
        "",
    ]
    separate = bare["cpu_us_per_req"] + base["encode_us"] + base["search_us"]
    servers = {**runs}
    if hand:
        servers["hand-written endpoint"] = hand
    if floor:
        servers["floor endpoint"] = floor
    head = ["server", "req/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx", "server CPU µs/req",
            "ratio to baseline", "server cores used", "CPU split across workers %",
            "ratio, separate-loop baseline", "ratio to hand-written", "ratio to floor"]  # fmt: skip
    lines += table(
        head,
        (
            [name, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
             f"{r['p99_ms']:.2f}", r["non_2xx"], f"{r['cpu_us_per_req']:.0f}", f"{r['ratio']:.2f}",
             f"{r['server_cores']:.2f}", r["worker_split"] or "-",
             f"{r['cpu_us_per_req'] / separate:.2f}",
             f"{r['hand_ratio']:.2f}" if "hand_ratio" in r else "-",
             f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-"]
            for name, r in servers.items()
        ),
    )  # fmt: skip
    if options:
        names = list(next(iter(options.values())))
        lines += [
            "",
            f"What each option costs (medians of {meta['option_rounds']} rounds of "
            f"{meta['option_duration']} s of wrk per row, options interleaved"
            + ("" if meta["sequential"] else ", the servers under load together")
            + "; 2,000 bodies, known users, 16 connections; Δ = CPU µs/request over "
            "`plain` on the same server):",
            "",
        ]
        rows = []
        for opt, per in options.items():
            cells = [f"{opt}: {OPTION_NOTES[opt]}"]
            for s_ in names:
                r, plain = per[s_], options["plain"][s_]
                delta = r["cpu_us_per_req"] - plain["cpu_us_per_req"]
                cells += [f"{r['rps']:.0f}", f"{r['cpu_us_per_req']:.0f}"]
                cells.append("-" if opt == "plain" else f"{delta:+.0f}")
            rows.append(cells)
        lines += table(
            ["bodies"] + [f"{s_} {c}" for s_ in names for c in ("req/s", "CPU µs/req", "Δ µs")],
            rows,
        )
    if batch_res:
        lines += [
            "",
            "Batch endpoint (2 client processes, "
            f"{next(iter(batch_res.values()))['batch_size']} users per call, k=10, 10 s): "
            + "; ".join(
                f"{name}: {r['users_per_s']:.0f} users/s"
                + f" ({r['cpu_us_per_user']:.0f} µs server CPU per user)"
                for name, r in batch_res.items()
            )
            + ".",
        ]
        c = meta.get("batch_ceiling")
        if c:
            lines[-1] += (
                f" Ceiling: the work alone — one batched encode of {c['size']} known users and "
                f"one batched FAISS search (k={c['k']} + |seen|, as the service fetches), in "
                f"{c['procs']} processes at once, no HTTP, no JSON — runs {c['users_per_s']:.0f} "
                f"users/s, {c['procs'] * 1e6 / c['users_per_s']:.0f} µs of CPU per user "
                f"({c['search_share']:.0%} of it in the search)."
            )
    return "\n".join(lines) + "\n"


def write_report(out: Path, n: int, text: str) -> None:
    head = (
        "# Serving benchmark\n\nProduced by `bench/serve.py` (see its docstring for what is measured). "
        "16 connections, wrk on loopback, 5,000 varied bodies, k=50. Where a worker's time goes: "
        "bench/results/profile.md (bench/serve_profile.py, flame graphs before/after).\n\n"
    )
    sections = {}
    if out.exists():
        for block in re.split(r"(?m)^(?=## )", out.read_text()):
            m = re.match(r"## ([\d,]+) items( \(nprobe tuned\))?", block)
            if m:
                sections[(int(m.group(1).replace(",", "")), bool(m.group(2)))] = (
                    block.rstrip() + "\n"
                )
    sections[(n, "(nprobe tuned)" in text.splitlines()[0])] = text
    atomic_write_text(out, head + "\n".join(sections[k] for k in sorted(sections)))


def _round_ratio(runs: list[dict], refs: list[dict]) -> float:
    """Median over rounds of CPU per request of ``runs`` / of ``refs`` in the same round."""
    return float(
        np.median(
            [r["cpu_us_per_req"] / f["cpu_us_per_req"] for r, f in zip(runs, refs, strict=True)]
        )
    )


def _median_run(runs: list[dict]) -> dict:
    """Per-metric medians over rounds (robust to a neighbour's job starting mid-run)."""
    out = {
        k: float(np.median([r[k] for r in runs]))
        for k in runs[0]
        if isinstance(runs[0][k], int | float)
    }
    out["worker_split"] = runs[len(runs) // 2]["worker_split"]
    out["socket_errors"] = "; ".join(r["socket_errors"] for r in runs if r["socket_errors"])
    out["non_2xx"] = sum(r["non_2xx"] for r in runs)
    out["rounds"] = len(runs)
    return out


def _worktree(ref: str, cache: Path) -> tuple[Path, str]:
    """A detached git worktree of ``ref`` (reused if it exists), and its short hash."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = cache / f"code-{sha}"
    if not (path / "service").is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), sha],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return path, sha


def _head() -> str:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(  # changes to what is served, not to bench/ or results
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "service", "csmf"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return f"{sha}{' + uncommitted changes' if dirty else ''}" if sha else "this tree"


def main() -> None:
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
        help="also serve this commit (a git worktree under --cache) and measure it in the same "
        "rounds, option rows and batch run: before/after side by side",
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
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "serve.md")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get update && apt-get install -y wrk")
    from serve_data import bench_bundle

    load_before = os.getloadavg()[0]
    t0 = time.time()
    bundle = bench_bundle(args.items, args.cache, nprobe=args.nprobe, tune=args.tune)
    manifest = read_manifest(bundle)
    print(f"bundle {bundle} ready in {time.time() - t0:.0f}s", flush=True)
    tmp = args.cache / "run"
    tmp.mkdir(parents=True, exist_ok=True)
    bodies = make_bodies(bundle, args.items)
    lua = write_lua(bodies, tmp / "bodies.lua")
    w = args.workers
    head = _head()
    codes = {f"service at {head}": ROOT}
    before = None
    if args.before:
        path, before = _worktree(args.before, args.cache)
        codes = {f"service before ({before})": path, **codes}

    base = in_process(bundle, bodies)
    print(f"in process, alone: {base}", flush=True)
    if w > 1:
        loaded = in_process_parallel(bundle, bodies, w)
        print(f"in process, {w} at once: {loaded}", flush=True)
        base = {**loaded, "alone": base, "parallel": w}
    ceiling = batch_ceiling(bundle, w, args.batch_size, 10)
    print(f"batch ceiling: {ceiling}", flush=True)

    # Bare and the services side by side (an idle uvicorn costs nothing), measured alternately so
    # a change in the machine's load hits all alike; the ratio is taken per round.
    bare_p = start_bare(bare_port := _free_port(), w)
    hand_p = start_bench_server("serve_handwritten.py", bundle, hand_port := _free_port(), w)
    floor_p = start_bench_server("serve_floor.py", bundle, floor_port := _free_port(), w)
    procs = {name: (port := _free_port(), start_service(bundle, port, w, tmp, code=code))
             for name, code in codes.items()}  # fmt: skip
    bare_runs: list[dict] = []
    hand_runs: list[dict] = []
    floor_runs: list[dict] = []
    svc_runs: dict[str, list[dict]] = {name: [] for name in codes}
    ratios: dict[str, list[float]] = {name: [] for name in codes}
    options: dict[str, dict[str, dict]] = {}
    batch_res: dict[str, dict] = {}
    try:
        _wait_ready(bare_port, bare_p)
        _wait_ready(hand_port, hand_p)
        _wait_ready(floor_port, floor_p)
        for port, proc in procs.values():
            _wait_ready(port, proc)
        same = parity(
            {**{name: port for name, (port, _) in procs.items()}, "hand-written": hand_port,
             "floor": floor_port},
            bodies[:300],
        )  # fmt: skip
        print(f"parity: {same}", flush=True)

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
            targets = {"bare": (bare_port, lua, bare_p.pid)}
            targets["hand"] = (hand_port, lua, hand_p.pid)
            targets["floor"] = (floor_port, lua, floor_p.pid)
            targets.update({name: (port, lua, proc.pid) for name, (port, proc) in procs.items()})
            got_round = measure(targets, args.duration)
            b = got_round.pop("bare")
            bare_runs.append(b)
            hw = got_round.pop("hand")
            hand_runs.append(hw)
            fl = got_round.pop("floor")
            floor_runs.append(fl)
            print(f"round {i}: bare {b}", flush=True)
            print(f"         hand-written {hw}", flush=True)
            print(f"         floor {fl}", flush=True)
            for name, r in got_round.items():
                svc_runs[name].append(r)
                ratios[name].append(r["cpu_us_per_req"] / (b["cpu_us_per_req"] + work_us(base)))
                print(f"         {name} {r}", flush=True)
        if args.option_duration > 0:  # options interleaved, servers together, medians over rounds
            luas = {
                opt: write_lua(option_bodies(bundle, args.items, opt), tmp / f"opt-{opt}.lua")
                for opt in OPTIONS
            }
            got: dict[tuple[str, str], list[dict]] = {}
            for _ in range(args.option_rounds):
                for opt in OPTIONS:
                    targets = {
                        name: (port, luas[opt], proc.pid) for name, (port, proc) in procs.items()
                    }
                    for name, r in measure(targets, args.option_duration).items():
                        got.setdefault((opt, name.replace("service ", "")), []).append(r)
                        print(f"option {opt} {name}: {r}", flush=True)
            for (opt, short), rs in got.items():
                options.setdefault(opt, {})[short] = _median_run(rs)
        with ThreadPoolExecutor(1 if args.sequential else len(procs)) as ex:
            futs = {
                name: ex.submit(
                    batch,
                    port,
                    bundle,
                    args.batch_size,
                    2,
                    10,
                    10,
                    tmp / f"batch-{port}",
                    proc.pid,
                )
                for name, (port, proc) in procs.items()
            }
            for name, f in futs.items():
                batch_res[name] = f.result()
                print(f"batch {name}: {batch_res[name]}", flush=True)
    finally:
        _stop(bare_p)
        _stop(hand_p)
        _stop(floor_p)
        for _, proc in procs.values():
            _stop(proc)
    bare = _median_run(bare_runs)
    hand = _median_run(hand_runs)
    hand["ratio"] = hand["cpu_us_per_req"] / (bare["cpu_us_per_req"] + work_us(base))
    floor = _median_run(floor_runs)
    floor["ratio"] = floor["cpu_us_per_req"] / (bare["cpu_us_per_req"] + work_us(base))
    hand["floor_ratio"] = _round_ratio(hand_runs, floor_runs)
    runs = {
        f"{name}, {w} workers": {
            **_median_run(svc_runs[name]),
            "ratio": float(np.median(ratios[name])),
            "hand_ratio": _round_ratio(svc_runs[name], hand_runs),
            "floor_ratio": _round_ratio(svc_runs[name], floor_runs),
        }
        for name in codes
    }
    if args.single:
        port = _free_port()
        proc = start_service(bundle, port, 1, tmp)
        try:
            _wait_ready(port, proc)
            one = _median_run([wrk(port, lua, args.duration, args.connections, proc.pid)])
            alone = base.get("alone", base)  # one worker: the single-process measurement
            one["ratio"] = one["cpu_us_per_req"] / (bare["cpu_us_per_req"] + work_us(alone))
            runs[f"service at {head}, 1 worker (no multiprocess metrics)"] = one
            print(f"service x1: {one}", flush=True)
        finally:
            _stop(proc)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": script_command(__file__),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "baseline_us": bare["cpu_us_per_req"] + work_us(base),
        "rounds": args.rounds,
        "duration": args.duration,
        "option_duration": args.option_duration,
        "option_rounds": args.option_rounds,
        "sequential": args.sequential,
        "before": before,
        "head": head,
        "parity": same,
        "batch_ceiling": ceiling,
    }
    write_report(
        args.out,
        args.items,
        section(args.items, manifest, base, bare, runs, batch_res, options, meta, hand, floor),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
