"""The daily loop on MovieLens-100K: what each step of `csmf daily` costs, and what its gate saw.

    csmf data ml-100k --out data/ml-100k
    nice -n 10 .venv/bin/python bench/daily_ml100k.py --data data/ml-100k

The events are cut by time into "days" (default: the first 80 % of events, then 85 %, 90 %, 95 %;
each day's folder holds every event up to its cut, as a growing event log would). Day one trains
from scratch (configs/ml-100k.toml with the demo's shortened schedule, one thread); every later
day is a warm start of the serving run. The latest period (--period-s, default 7 days of event
time) is the holdout both models are scored on. Each day runs the real CLI in its own process;
the table reports its outcome (published, or refused by the gate), its wall time, the time of
each step (from STATE/status.json) and the gate's fused Recall@50 candidate / serving. One seed: cost figures, not a quality claim (the warm start's
quality against a full retrain is bench/continual.py's). Writes bench/results/daily-ml-100k.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from csmf.results import finish_run, run_info, run_line, script_command, table, write_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--set", "train.epochs=4", "--set", "train.ar_epochs=2", "--set", "train.threads=1"]
STEPS = ("events", "train", "gate", "build", "publish")


def make_days(data: Path, cuts: list[float], out: Path) -> list[Path]:
    """One dataset folder per cut: events up to that quantile of the timestamps (events/ as the
    service's log lays them out) and the full users and items tables."""
    events = pq.read_table(data / "events.parquet")
    ts = events["timestamp"].to_numpy()
    days = []
    for i, q in enumerate(cuts):
        day = out / f"day{i + 1}"
        (day / "events").mkdir(parents=True)
        cut = int(np.quantile(ts, q))
        pq.write_table(events.filter(pc.less_equal(events["timestamp"], cut)),
                       day / "events" / "part-0.parquet")  # fmt: skip
        for t in ("users.parquet", "items.parquet"):
            shutil.copy(data / t, day / t)
        days.append(day)
    return days


def run_day(state: Path, day: Path, first: bool, period_s: float) -> dict:
    cmd = [sys.executable, "-m", "csmf.cli", "daily", "--state", str(state), "--data", str(day),
           "--period-s", str(period_s)]  # fmt: skip
    if first:
        cmd += ["--config", str(ROOT / "configs" / "ml-100k.toml"), *DEMO]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 3):  # 3: the gate refused the candidate, a result too
        raise SystemExit(f"{day.name}: csmf daily exited {p.returncode}\n{p.stderr[-3000:]}")
    attempt = json.loads((state / "status.json").read_text())["last_attempt"]
    return {"day": day.name, "events": pq.read_metadata(day / "events" / "part-0.parquet").num_rows,
            "trained": "from scratch" if first else "warm start", "wall_s": round(wall, 1),
            "outcome": attempt["outcome"], "steps": attempt["steps"],
            "gate": attempt["gate"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "ml-100k")
    ap.add_argument("--cuts", default="0.8,0.85,0.9,0.95", help="event-time quantiles, one per day")
    ap.add_argument("--period-s", type=float, default=7 * 86400.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "daily-ml-100k")
    args = ap.parse_args()
    info = run_info(ROOT, watched=("csmf", "trainer", "index_builder", "daily"))
    with tempfile.TemporaryDirectory(prefix="csmf-daily-bench-") as tmp:
        days = make_days(args.data, [float(c) for c in args.cuts.split(",")], Path(tmp))
        rows = [run_day(Path(tmp) / "state", d, i == 0, args.period_s) for i, d in enumerate(days)]
    info = finish_run(info)
    head = ["day", "events", "trained", "outcome", "wall s", *(f"{s} s" for s in STEPS),
            "click R@50 cand / serving", "conv. R@50 cand / serving"]  # fmt: skip

    def gate(r: dict, t: str) -> str:
        g = r["gate"]
        serving = "—" if g["serving"] is None else f"{g['serving'][t]['recall']:.4f}"
        return f"{g['candidate'][t]['recall']:.4f} / {serving}"

    body = [run_line(info), "", *table(head, (
        [r["day"], f"{r['events']:,}", r["trained"], r["outcome"], f"{r['wall_s']:.1f}",
         *(f"{r['steps'].get(s, 0):.1f}" for s in STEPS), gate(r, "click"), gate(r, "conversion")]
        for r in rows), "llllrrrrrrrr"),  # fmt: skip
        "", f"Holdout: the latest {args.period_s / 86400:g} days of event time of each day's log "
        "(fused Recall@50 over its users; one seed). A refused day publishes nothing and the next "
        "day warm-starts from the serving run again. Wall time includes the process start (torch "
        "import) and the bundle's verification; `nice -n 10` on a shared 2-core machine."]  # fmt: skip
    md, _ = write_results(args.out, "csmf daily on MovieLens-100K", script_command(__file__),
                          body, {**info, "period_s": args.period_s, "days": rows})  # fmt: skip
    print("\n".join(body))
    print(f"wrote {md}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
