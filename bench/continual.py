"""Daily warm starts against full retrains, on MovieLens-100K split by time into ten periods.

The events are cut into ten consecutive periods of equal event counts (timestamp deciles). A
model is trained from scratch on periods 1–5; then, once per period q = 6..9, it is updated
twice on everything up to q:

- **warm**: ``csmf train --from`` the previous update (a chain: q = 7 continues q = 6's warm
  run), fine-tuning on the events newer than what it trained through (trainer/warm.py);
- **full**: a from-scratch cascade on periods 1..q (the same config);

and both are evaluated on period q + 1 (their dataset's test split: the global time split
``split.test_from`` = the start of q + 1; validation = the latest 10 % before it). Each
dataset's user and item tables hold only the entities seen in periods 1..q, so the warm start's
tables grow as new users and items arrive; test events of entities first seen in q + 1 are
dropped (neither model can know them). Quality: fused Recall@50 / nDCG@50 on clicks and
conversions (the config's ``eval.weights``); time: wall seconds of each update (load, encode,
train; one torch thread; run under ``nice``). Every run folder carries the key of what made it
(code, config, data, seed) and is reused only when that key matches.

    python bench/continual.py --data data/ml-100k --seeds 0 1 2 --jobs 3 \
        --set train.epochs=4 --set train.ar_epochs=2
    python bench/continual.py --render-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.harness.cache import bench_fingerprint, holds, remember, source_key
from csmf.results import finish_run, pm, run_info, run_line, script_command, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PERIODS = 10
FIRST = 5  # the initial model trains on periods 1..FIRST
TARGETS = ("click", "conversion")
CSMF = [sys.executable, "-m", "csmf.cli"]


def period_bounds(ts: np.ndarray, periods: int = PERIODS) -> np.ndarray:
    """(periods + 1,) timestamps: period k is [b[k-1], b[k]) — equal event counts, ties kept in
    one period (a bound is an event time)."""
    qs = np.quantile(ts, np.linspace(0, 1, periods + 1), method="lower").astype(np.int64)
    qs[-1] = ts.max() + 1
    return qs


def write_period_dataset(src: Path, out: Path, q: int, bounds: np.ndarray) -> dict:
    """The dataset of update q: events of periods 1..q, plus period q + 1's events of known
    users and items as the test split; tables = entities seen in periods 1..q."""
    ev = pq.read_table(src / "events.parquet")
    users, items = pq.read_table(src / "users.parquet"), pq.read_table(src / "items.parquet")
    ts = ev["timestamp"]
    past = ev.filter(pc.less(ts, int(bounds[q])))
    nxt = ev.filter(pc.and_(pc.greater_equal(ts, int(bounds[q])), pc.less(ts, int(bounds[q + 1]))))
    known_u, known_i = pc.unique(past["user_id"]), pc.unique(past["item_id"])
    nxt = nxt.filter(
        pc.and_(
            pc.is_in(nxt["user_id"], value_set=known_u), pc.is_in(nxt["item_id"], value_set=known_i)
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables([past, nxt]), out / "events.parquet")
    pq.write_table(
        users.filter(pc.is_in(users["user_id"], value_set=known_u)), out / "users.parquet"
    )
    pq.write_table(
        items.filter(pc.is_in(items["item_id"], value_set=known_i)), out / "items.parquet"
    )
    return {
        "period": q,
        "test_from": int(bounds[q]),
        "events": past.num_rows,
        "test_events": nxt.num_rows,
        "users": len(known_u),
        "items": len(known_i),
    }


def run(cmd: list[str], key: dict, out: Path) -> dict:
    """``csmf train ...`` into ``out`` unless ``out`` holds a run made with the same key; then
    ``csmf eval``. Returns {seconds, metrics} (seconds: the train command's wall time)."""
    if holds(out, key) and (out / "eval.json").exists():
        return json.loads((out / "bench-result.json").read_text())
    t0 = time.perf_counter()
    subprocess.run(cmd + ["--out", str(out), "--force", "--no-progress"], check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    subprocess.run([*CSMF, "eval", "--run", str(out)], check=True, cwd=ROOT, capture_output=True)
    ev = json.loads((out / "eval.json").read_text())
    train = json.loads((out / "train_metrics.json").read_text())
    result = {
        "seconds": seconds,
        "train_seconds": train["seconds"],
        "metrics": {
            t: {m: ev["metrics"][t]["fused"][m] for m in ("recall", "ndcg")} for t in TARGETS
        },
        "users": ev["users"],
        "grown": train.get("warm_start", {}).get("grown_rows"),
    }
    (out / "bench-result.json").write_text(json.dumps(result))
    remember(out, key)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    ap.add_argument("--config", type=Path, default=Path("configs/ml-100k.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/continual"))
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="config override (both)"
    )
    ap.add_argument("--warm-set", action="append", default=[], help="override for warm starts only")
    ap.add_argument("--out", type=Path, default=RESULTS / "continual-ml-100k")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    command = script_command(__file__)
    raw = args.out.with_name(args.out.name + ".json")
    if args.render_only:
        doc = json.loads(raw.read_text())
        render(doc, doc["command"], args.out)
        return

    info = run_info(ROOT, ("csmf", "trainer"))
    ev_ts = pq.read_table(args.data / "events.parquet", columns=["timestamp"])["timestamp"]
    bounds = period_bounds(ev_ts.to_numpy())
    code = source_key()
    config_text = args.config.read_text()
    datasets, rows = {}, []
    for q in range(FIRST, PERIODS):
        folder = args.work / "data" / f"p{q}"
        datasets[q] = write_period_dataset(args.data, folder, q, bounds)
        datasets[q]["key"] = bench_fingerprint(folder)
    base = [*CSMF, "train", "--config", str(args.config), "--set", "train.threads=1"]
    base += [x for s in args.sets for x in ("--set", s)]
    warm_sets = [x for s in args.warm_set for x in ("--set", s)]

    def chain(seed: int) -> list[dict]:
        """The initial model, then per period the full retrain and the chain's warm start."""
        out, prev, prev_key = [], None, None
        for q in range(FIRST, PERIODS):
            folder = args.work / "data" / f"p{q}"
            split = ["--set", f"split.test_from={datasets[q]['test_from']}"]
            common = {"code": code, "config": config_text, "sets": args.sets, "seed": seed,
                      "data": datasets[q]["key"]}  # fmt: skip
            full_out = args.work / f"s{seed}" / f"full-p{q}"
            full = run(
                [*base, *split, "--seed", str(seed), "--data", str(folder)],
                {**common, "kind": "full"}, full_out,
            )  # fmt: skip
            if prev is None:  # periods 1..FIRST: the initial model
                prev, prev_key = full_out, {**common, "kind": "full"}
                continue
            warm_out = args.work / f"s{seed}" / f"warm-p{q}"
            warm_key = {**common, "kind": "warm", "warm_sets": args.warm_set, "from": prev_key}
            warm = run(
                [*CSMF, "train", "--from", str(prev), "--data", str(folder), *split,
                 "--set", "train.threads=1", *warm_sets],
                warm_key, warm_out,
            )  # fmt: skip
            out.append({"seed": seed, "period": q, "full": full, "warm": warm})
            prev, prev_key = warm_out, warm_key
            print(
                f"seed {seed} q {q}: full {full['seconds']:.0f}s warm {warm['seconds']:.0f}s",
                flush=True,
            )
        return out

    with ThreadPoolExecutor(args.jobs) as pool:  # the runs are subprocesses: threads only wait
        for part in pool.map(chain, args.seeds):
            rows += part
    doc = {
        "run": finish_run(info),
        "code_key": code,
        "seeds": args.seeds,
        "datasets": {str(q): d for q, d in datasets.items()},
        "rows": rows,
    }
    render(doc, command, args.out)


def render(doc: dict, command: str, out: Path) -> None:
    rows = doc["rows"]
    periods = sorted({r["period"] for r in rows})

    def stat(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values))

    lines = [
        f"{run_line(doc['run'])} Code key {doc['code_key']}, seeds {doc['seeds']}, one torch "
        "thread per run under `nice`."
        if "run" in doc  # results made before csmf.results.run_info: commit and load after only
        else f"Commit {doc['commit']} (code key {doc['code_key']}), seeds {doc['seeds']}, one "
        f"torch thread per run under `nice` on a shared 2-core box; load average after the run "
        f"{', '.join(f'{x:.1f}' for x in doc['load_after'])}.",
        "",
        "Fused Recall@50 / nDCG@50 on period q + 1 (mean ± std over seeds); relative difference "
        "= warm ÷ full − 1 of the means; time = wall seconds of the update command (load, "
        "encode, train).",
        "",
    ]
    header = ["q", "metric", "full retrain", "warm start", "warm vs full"]
    body, diffs, ratios = [], [], []
    for q in periods:
        rs = [r for r in rows if r["period"] == q]
        for t in TARGETS:
            for m in ("recall", "ndcg"):
                f = stat([r["full"]["metrics"][t][m] for r in rs])
                w = stat([r["warm"]["metrics"][t][m] for r in rs])
                diffs.append(w[0] / f[0] - 1)
                name = f"{t} {'Recall' if m == 'recall' else 'nDCG'}@50"
                body.append([q, name, pm(f), pm(w), f"{w[0] / f[0] - 1:+.1%}"])
        fs, ws = stat([r["full"]["seconds"] for r in rs]), stat([r["warm"]["seconds"] for r in rs])
        ratios.append(ws[0] / fs[0])
        body.append(
            [q, "update seconds", pm(fs, ".1f"), pm(ws, ".1f"), f"{ws[0] / fs[0]:.1%} of full"]
        )
    lines += table(header, body, "rlrrr")
    lines += [
        "",
        f"Over the {len(periods)} updates: quality of the warm start relative to the full retrain "
        f"{np.mean(diffs):+.1%} on average (worst {min(diffs):+.1%}); its wall time "
        f"{np.mean(ratios):.1%} of the full retrain's on average (worst {max(ratios):.1%}).",
        "",
        "Datasets (entities seen up to q; test = period q + 1's events of known users and items):",
        "",
    ]
    ds = doc["datasets"]
    lines += table(
        ["q", "events 1..q", "test events", "users", "items"],
        [[q, d["events"], d["test_events"], d["users"], d["items"]] for q, d in ds.items()],
        "rrrrr",
    )
    trials = out.with_name(out.name + "-validation.json")
    if trials.exists():  # settings tried on validation before this run (hand-written record)
        t = json.loads(trials.read_text())
        if t.get("reading"):
            lines += ["", "## What it says", "", t["reading"]]
        lines += ["", "## Settings tried on validation", "", t["what"], ""]
        lines += table(
            ["variant", "click Recall@50", "click nDCG@50", "conv. Recall@50", "conv. nDCG@50"],
            [
                [r["variant"], *(f"{r[o][m]:.4f}" for o in TARGETS for m in ("recall", "ndcg"))]
                for r in t["rows"]
            ],
            "lrrrr",
        )
    write_results(
        out, "Warm starts against full retrains (ML-100K, ten periods)", command, lines, doc
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
