"""Load on running servers: wrk (req/s, latency percentiles, server CPU per request), the batch
endpoint from separate client processes, the parity check, and medians over rounds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from serve_servers import tree_cpu


def wrk(port: int, lua: Path, duration: int, connections: int, pid: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    subprocess.run(  # warm-up: connections, caches, FAISS lists in memory
        ["wrk", "-t2", f"-c{connections}", "-d2s", "-s", str(lua), url],
        capture_output=True,
        check=True,
    )
    cpu0 = tree_cpu(pid)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu1 = tree_cpu(pid)
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
        # a server starved for the whole window (a narrow filter at 1M items on a loaded box)
        # completes nothing: NaN, shown as such, rather than the run dying
        "cpu_us_per_req": cpu / reqs * 1e6 if reqs else float("nan"),
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
    cpu0 = sum(tree_cpu(pid).values())
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
    cpu = sum(tree_cpu(pid).values()) - cpu0
    users = sum(r["users"] for r in res) + size * clients  # and each client's warm-up call
    return {
        "users_per_s": sum(r["users"] / r["seconds"] for r in res),
        "cpu_us_per_user": cpu / users * 1e6,
        "batch_size": size,
        "clients": clients,
        "k": k,
    }


def parity(ports: dict[str, int], bodies: list[str]) -> dict:
    """POST each body to every server and compare each response with the first server's: count
    those not identical to the last bit (every field but the request id and ``took_ms``, scores
    compared as the floats they are), and those whose item ids differ or whose scores differ by
    more than 1e-4 (float32 sums in a different order, as another encoder gives)."""
    import httpx

    first, *others = ports
    diffs = {name: 0 for name in others}
    inexact = {name: 0 for name in others}
    with httpx.Client(timeout=30) as c:
        for body in bodies:
            got = {}
            for name, port in ports.items():
                r = c.post(f"http://127.0.0.1:{port}/v1/retrieve", content=body)
                r.raise_for_status()
                doc = r.json()
                doc.pop("request_id", None)  # signed, with a time: differs on every call
                doc.pop("took_ms", None)
                got[name] = doc
            for name in others:
                a, b = got[first], got[name]
                inexact[name] += a != b
                ia = [(x["item_id"], x["score"]) for x in a["items"]]
                ib = [(x["item_id"], x["score"]) for x in b["items"]]
                same = [i for i, _ in ia] == [i for i, _ in ib] and all(
                    abs(x - y) <= 1e-4 * max(1.0, abs(x))
                    for (_, x), (_, y) in zip(ia, ib, strict=True)
                )
                diffs[name] += not same
    return {
        "bodies": len(bodies),
        "reference": first,
        "differences": diffs,
        "not_identical": inexact,
    }


def round_ratio(runs: list[dict], refs: list[dict]) -> float:
    """Median over rounds of CPU per request of ``runs`` / of ``refs`` in the same round."""
    return float(
        np.median(
            [r["cpu_us_per_req"] / f["cpu_us_per_req"] for r, f in zip(runs, refs, strict=True)]
        )
    )


def median_run(runs: list[dict]) -> dict:
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
