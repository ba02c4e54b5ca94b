"""What the service's metric updates cost per request: prometheus_client's public API against the
direct writers of service/metric_writers.py, in one process and with multiprocess files.

One retrieve request records 4 histogram observations (request latency and the features, encode
and search stages) and 3 counter increments (requests, users, impressions). Each mode runs in its
own subprocess (multiprocess mode is chosen when prometheus_client is imported); inside it, public
and direct rounds alternate so the machine's changing load hits both alike. The figure is the
median over rounds of the CPU time per request's worth of updates.

    python bench/metric_writes.py [--requests 20000] [--rounds 7] [--out bench/results/metric-writes.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _children(direct: bool):
    """(histograms, counters) as a request of the service updates them."""
    from service.metrics import HotCounter, HotHistogram, ServiceMetrics

    m = ServiceMetrics()
    hist = [m.request_seconds.labels("/v1/retrieve", "200")]
    hist += [m.stage_seconds.labels(s) for s in ("features", "encode", "search")]
    cnt = [
        m.requests_total.labels("default", "single"),
        m.users_total.labels("single", "false"),
        m.impressions_total.labels("default", "_none"),
    ]
    if direct:
        return [HotHistogram(h) for h in hist], [HotCounter(c) for c in cnt]
    return hist, cnt


def _round(hist, cnt, n: int) -> float:
    """CPU µs per request's worth of updates."""
    h0, h1, h2, h3 = hist
    c0, c1, c2 = cnt
    values = [0.0003 * (1 + i % 17) for i in range(n)]  # spread over the buckets
    t = time.process_time()
    for v in values:
        h0.observe(v * 4)
        h1.observe(v / 8)
        h2.observe(v / 4)
        h3.observe(v / 2)
        c0.inc()
        c1.inc(1)
        c2.inc(50)
    return (time.process_time() - t) / n * 1e6


def _child(n: int, rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    sets = {"public": _children(False), "direct": _children(True)}
    got: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(rounds):
        for name, (hist, cnt) in sets.items():
            got[name].append(_round(hist, cnt, n))
    print(json.dumps(got))


def _run_mode(multiprocess: bool, n: int, rounds: int) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory() as d:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = d
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), str(rounds)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests' worth per round")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds per mode")
    ap.add_argument("--out", type=Path, help="write a markdown table and a .json beside it")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    for mode, mp in (("one process", False), ("multiprocess files (workers > 1)", True)):
        got = _run_mode(mp, args.requests, args.rounds)
        rows.append(
            {
                "mode": mode,
                "public_us": statistics.median(got["public"]),
                "direct_us": statistics.median(got["direct"]),
                "public_min_us": min(got["public"]),
                "direct_min_us": min(got["direct"]),
                "rounds": got,
            }
        )
    load1 = os.getloadavg()[0]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Metric updates per request",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at {commit}, command `python "
        f"bench/metric_writes.py --requests {args.requests} --rounds {args.rounds}`; "
        f"prometheus_client {version('prometheus-client')}; "
        f"load average {load0:.2f} before, {load1:.2f} after, on {os.cpu_count()} cores. "
        "CPU µs for one request's updates (4 histogram observations, 3 counter increments), "
        f"median (and fastest) of {args.rounds} alternating rounds of {args.requests:,} requests.",
        "",
        "| mode | public API µs | direct writers µs | saved µs/request | fastest round: public / direct µs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['public_us']:.2f} | {r['direct_us']:.2f} | "
            f"{r['public_us'] - r['direct_us']:.2f} | "
            f"{r['public_min_us']:.2f} / {r['direct_min_us']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
