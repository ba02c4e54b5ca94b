"""Daily warm starts against full retrains, on MovieLens-100K split by time into ten periods.

The events are cut into ten consecutive periods of equal event counts (timestamp deciles). A
model is trained from scratch on periods 1..F (``--first``, 5); then, once per period
q = F + 1 .. U - 1 (``--until``, 10), it is updated on everything up to q:

- **full**: a from-scratch cascade on periods 1..q (the same config);
- each **variant** (``--variant NAME=SET;SET``; default: the config's warm start, the warm start
  that also fine-tunes the layers, and no update at all): ``csmf train --from`` the variant's
  previous update (a chain: q + 1 continues q's run), fine-tuning on the events newer than what
  it trained through (trainer/warm.py),

and every model is evaluated on period q + 1 (its dataset's test split: the global time split
``split.test_from`` = the start of q + 1). Each dataset's user and item tables hold only the
entities seen in periods 1..q, so warm starts grow their tables as new users and items arrive;
test events of entities first seen in q + 1 are dropped (no model can know them). Quality:
fused Recall@50 / nDCG@50 on clicks and conversions (the config's ``eval.weights``), compared
per (seed, update) pair; time: wall seconds of each update command (load, encode, train; one
torch thread; run under ``nice``). Every run folder carries the key of what made it (code,
config, data, seed, variant) and is reused only when that key matches.

Warm-start settings were first chosen on a **validation window** — the same protocol shifted
three periods earlier (``--first 3 --until 6``), or cut from the earliest events (``--events``)
— so that no period the test reports was read to choose (``continual-ml-100k-validation*.md``).

The first validation window did not predict the test window (there a period is a quarter of the
data, on the test window a sixth to a ninth). ``--events 0.6`` cuts the ten periods from the
earliest 60 % of the events instead: the test window's shape, none of its evaluated periods read
(``continual-ml-100k-validation-3.md`` to ``-6.md``). Its choice did not transfer either
(``continual-ml-100k-touched.md``).

So settings are now chosen on the test window's own periods but on other users: every run is
also scored on each half of its test users, split by a hash of the user id (:func:`user_half`).
``--report val`` renders the half that chooses, ``--report test`` the half that reports — the
same runs, disjoint users (``continual-ml-100k-choice.md``, then ``continual-ml-100k.md``;
each file names its command; a variant's runs are found again by its overrides, so the report
reruns a subset of the choice's variants from the cache):

    python bench/continual.py --data data/ml-100k --seeds 0 1 2 3 4 --jobs 2 \
        --set train.epochs=4 --set train.ar_epochs=2 --report val --variant ... \
        --out bench/results/continual-ml-100k-choice
    python bench/continual.py --data data/ml-100k --seeds 0 1 2 3 4 --jobs 2 \
        --set train.epochs=4 --set train.ar_epochs=2 --report test
    python bench/continual.py --timing 1

Every run is also scored per group of test users (:func:`user_subsets`: first seen in the
update's period, active in it, or seen only before it), the breakdown that found the drift.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import stats

from bench.harness.cache import KEY_FILE, bench_fingerprint, holds, remember, source_key
from csmf.results import finish_run, pm, run_info, run_line, script_command, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PERIODS = 10
FIRST = 5  # the initial model trains on periods 1..FIRST
TARGETS = ("click", "conversion")
METRICS = [(t, m) for t in TARGETS for m in ("recall", "ndcg")]
# name → warm-start --set overrides: continual-ml-100k.md's, the chosen setting first
VARIANTS = {
    "ids, 2 epochs, lr 0.01": ["warm.train=ids", "warm.epochs=2", "warm.lr=0.01"],
    "tables, 3 epochs": ["warm.train=tables", "warm.epochs=3"],
    "touched, 2 epochs": ["warm.train=touched", "warm.epochs=2"],
    "ids, 10 epochs": ["warm.train=ids", "warm.epochs=10"],
    "no update": ["warm.epochs=0"],
}
CSMF = [sys.executable, "-m", "csmf.cli"]


def period_bounds(ts: np.ndarray, periods: int = PERIODS) -> np.ndarray:
    """(periods + 1,) timestamps: period k is [b[k-1], b[k]) — equal event counts, ties kept in
    one period (a bound is an event time)."""
    qs = np.quantile(ts, np.linspace(0, 1, periods + 1), method="lower").astype(np.int64)
    qs[-1] = ts.max() + 1
    return qs


def window_events(src: Path, fraction: float) -> pa.Table:
    """The earliest ``fraction`` of ``src``'s events (by time; ties at the cut kept); one
    ``events.parquet`` file or an ``events/`` folder of them (``csmf data synthetic``)."""
    one = src / "events.parquet"
    ev = pq.read_table(one if one.exists() else src / "events")
    if fraction >= 1.0:
        return ev
    cut = np.quantile(ev["timestamp"].to_numpy(), fraction, method="lower")
    return ev.filter(pc.less_equal(ev["timestamp"], int(cut)))


def write_period_dataset(
    src: Path, out: Path, q: int, bounds: np.ndarray, fraction: float = 1.0
) -> dict:
    """The dataset of update q: events of periods 1..q, plus period q + 1's events of known
    users and items as the test split; tables = entities seen in periods 1..q. ``fraction``:
    the periods cut the earliest fraction of the events only."""
    ev = window_events(src, fraction)
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


def warm_folder(sets: list[str]) -> str:
    """A variant's run folders are named by its overrides, so a rerun with other variants, or
    in another order, finds its runs again."""
    return "warm-" + hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:10]


def period_folder(work: Path, q: int, fraction: float = 1.0) -> Path:
    """Where update q's dataset is written (one folder per window)."""
    return work / "data" / (f"p{q}" if fraction >= 1.0 else f"e{fraction:g}-p{q}")


GROUPS = ("new", "active", "stale")
HALVES = ("val", "test")  # test users split by a hash of their id: choose on one, report the other


def user_half(user_id: object) -> str:
    """The half a test user belongs to, fixed by their id alone (the same in every run)."""
    return HALVES[zlib.crc32(str(user_id).encode()) % 2]


def user_subsets(run_dir: Path, period_start: int) -> dict:
    """Fused Recall@50 / nDCG@50 of the run in ``run_dir`` per subset of its test users.
    "groups": **new** (first seen in the update's period q, which starts at ``period_start``),
    **active** (seen before q and in it) and **stale** (seen before q, not in it: only a full
    retrain trains their rows together with the items the new events move). "halves": the
    users of each :func:`user_half`. {"groups" | "halves": {name: {"users": {target: n},
    target: {recall, ndcg}}}}."""
    import torch

    from trainer.config import RunConfig
    from trainer.encoding import user_items
    from trainer.evaluate import encode_all, fused_ranker, rank_metrics
    from trainer.pipeline import load_checkpoint, prepare

    torch.set_num_threads(1)
    ckpt = load_checkpoint(run_dir)
    cfg = RunConfig.from_dict(ckpt.train_config)
    enc = prepare(cfg, ckpt.dataset, vocabs=(ckpt.user_vocab, ckpt.item_vocab))
    ev = enc.events
    seen = np.setdiff1d(np.arange(len(ev.user)), enc.split.test)  # periods 1..q
    first = np.full(enc.n_users, np.iinfo(np.int64).max)
    last = np.full(enc.n_users, np.iinfo(np.int64).min)
    np.minimum.at(first, ev.user[seen], ev.ts[seen])
    np.maximum.at(last, ev.user[seen], ev.ts[seen])
    group = np.where(first >= period_start, 0, np.where(last >= period_start, 1, 2))
    ids = ckpt.user_vocab.ids.values  # user index u is vocabulary entry u
    half = np.array([HALVES.index(user_half(ids[u])) for u in range(enc.n_users)])
    model = ckpt.build_model()
    e, v = encode_all(model, enc)
    rankers = {"fused": fused_ranker(model, cfg.eval.weights)}
    exclude = user_items(enc, enc.split.train)
    out: dict = {
        "groups": {g: {"users": {}} for g in GROUPS},
        "halves": {h: {"users": {}} for h in HALVES},
    }
    for target in TARGETS:
        truth = user_items(enc, enc.split.test, ev.positive(target))
        for kind, names, of in (("groups", GROUPS, group), ("halves", HALVES, half)):
            for k, name in enumerate(names):
                part = {u: items for u, items in truth.items() if of[u] == k}
                out[kind][name]["users"][target] = len(part)
                m = rank_metrics(e, v, rankers, part, exclude, cfg.eval.n)["fused"]
                out[kind][name][target] = m
    return out


def run(cmd: list[str], key: dict, out: Path, period_start: int | None = None) -> dict:
    """``csmf train ...`` into ``out`` unless ``out`` holds a run made with the same key; then
    ``csmf eval``. Returns {seconds, metrics} (seconds: the train command's wall time) and, with
    ``period_start`` (an update's period), the metrics per subset of users (:func:`user_subsets`)."""
    if holds(out, key) and (out / "eval.json").exists():
        result = json.loads((out / "bench-result.json").read_text())
        if period_start is not None and "halves" not in result:  # cached before subsets
            result.update(user_subsets(out, period_start))
            (out / "bench-result.json").write_text(json.dumps(result))
        return result
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
    if period_start is not None:
        result.update(user_subsets(out, period_start))
    (out / "bench-result.json").write_text(json.dumps(result))
    remember(out, key)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    ap.add_argument("--config", type=Path, default=Path("configs/ml-100k.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--first", type=int, default=FIRST, help="initial model on periods 1..FIRST")
    ap.add_argument("--until", type=int, default=PERIODS, help="last period evaluated")
    ap.add_argument(
        "--events", type=float, default=1.0, metavar="FRACTION",
        help="cut the ten periods from the earliest FRACTION of the events only: a validation "
        "window with the test window's shape (0.6: the test's periods 7..10 are never read)",
    )  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("runs/continual"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (all)")
    ap.add_argument(
        "--variant", action="append", default=[],
        help="NAME=SET;SET: a warm-start chain with these --set overrides (repeatable; default: "
        + "; ".join(f"{k!r}" for k in VARIANTS) + ")",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "continual-ml-100k")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once")
    ap.add_argument(
        "--timing", type=int, default=0, metavar="REPS",
        help="time every update of the run at --out REPS more times back to back, one run at a "
        "time (its first seed; the full retrain and each variant alternating; the chains' run "
        "folders in --work), for wall-time ratios less exposed to the machine's load than the "
        "chains' (which run --jobs at once)",
    )  # fmt: skip
    ap.add_argument(
        "--report", choices=("all", *HALVES), default=None,
        help="whose quality the tables show: every test user (default), or one half of them "
        "(by a hash of the user id): choose settings on 'val', report them on 'test' — the "
        "same periods, disjoint users. With --render-only: re-render the run for this half",
    )  # fmt: skip
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    command = script_command(__file__)
    raw = args.out.with_name(args.out.name + ".json")
    if args.render_only or args.timing:
        doc = json.loads(raw.read_text())
        if args.report is not None:
            doc["report"] = args.report
        if args.timing:
            doc["timing"] = time_updates(doc, args.work, args.timing)
            doc["timing_run"] = {"command": command, **finish_run(run_info(ROOT))}
        render(doc, doc["command"], args.out)
        return
    if not 1 <= args.first < args.until - 1 < PERIODS:
        ap.error(f"need 1 <= --first < --until - 1 < {PERIODS}")
    if not 0.0 < args.events <= 1.0:
        ap.error(f"--events must be in (0, 1], got {args.events}")
    variants = dict(VARIANTS)
    if args.variant:
        variants = {}
        for v in args.variant:
            name, _, sets = v.partition("=")
            variants[name.strip()] = [x.strip() for x in sets.split(";") if x.strip()]
    info = run_info(ROOT, ("csmf", "trainer"))
    bounds = period_bounds(window_events(args.data, args.events)["timestamp"].to_numpy())
    code = source_key()
    config_text = args.config.read_text()
    updates = range(args.first, args.until)  # dataset q: periods 1..q, test = period q + 1
    datasets = {}
    for q in updates:
        folder = period_folder(args.work, q, args.events)
        datasets[q] = write_period_dataset(args.data, folder, q, bounds, args.events)
        datasets[q]["key"] = bench_fingerprint(folder)
    base = [*CSMF, "train", "--config", str(args.config), "--set", "train.threads=1"]
    base += [x for s in args.sets for x in ("--set", s)]

    def chain(seed: int) -> list[dict]:
        """The initial model, then per period the full retrain and each variant's warm start."""
        out, prev = [], {}
        for q in updates:
            folder = period_folder(args.work, q, args.events)
            split = ["--set", f"split.test_from={datasets[q]['test_from']}"]
            common = {"code": code, "config": config_text, "sets": args.sets, "seed": seed,
                      "data": datasets[q]["key"]}  # fmt: skip
            full_out = args.work / f"s{seed}" / f"full-p{q}"
            full_key = {**common, "kind": "full"}
            start = datasets[q - 1]["test_from"] if q > args.first else None  # period q's
            full = run(
                [*base, *split, "--seed", str(seed), "--data", str(folder)], full_key, full_out,
                start,
            )  # fmt: skip
            if q == args.first:  # periods 1..first: the initial model every chain starts from
                prev = {name: (full_out, full_key) for name in variants}
                continue
            row = {"seed": seed, "period": q, "full": full, "variants": {}}
            for name, sets in variants.items():
                src, src_key = prev[name]
                warm_out = args.work / f"s{seed}" / f"{warm_folder(sets)}-p{q}"
                warm_key = {**common, "kind": "warm", "warm_sets": sets, "from": src_key}
                row["variants"][name] = run(
                    [*CSMF, "train", "--from", str(src), "--data", str(folder), *split,
                     "--set", "train.threads=1", *(x for s in sets for x in ("--set", s))],
                    warm_key, warm_out, start,
                )  # fmt: skip
                prev[name] = (warm_out, warm_key)
            out.append(row)
            took = ", ".join(f"{n} {r['seconds']:.0f}s" for n, r in row["variants"].items())
            print(f"seed {seed} q {q}: full {full['seconds']:.0f}s; {took}", flush=True)
        return out

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:  # the runs are subprocesses: threads only wait
        for part in pool.map(chain, args.seeds):
            rows += part
    doc = {
        "run": finish_run(info),
        "code_key": code,
        "seeds": args.seeds,
        "first": args.first,
        "until": args.until,
        "events": args.events,
        "sets": args.sets,
        "config": str(args.config),
        "variants": variants,
        "report": args.report or "all",
        "datasets": {str(q): d for q, d in datasets.items()},
        "rows": rows,
    }
    render(doc, command, args.out)


def time_updates(doc: dict, work: Path, reps: int) -> list[dict]:
    """Each update of ``doc``'s first seed again, ``reps`` times, one run at a time: the full
    retrain, then every variant warm-starting from the chain's previous run (in ``work``), into
    fresh folders. Returns [{period, rep, full, variants: {name: seconds}}]."""
    seed, first = doc["seeds"][0], doc["first"]
    config = doc.get("config", "configs/ml-100k.toml")  # runs before it was recorded: the default
    base = [*CSMF, "train", "--config", config, "--set", "train.threads=1"]
    base += [x for s in doc["sets"] for x in ("--set", s)]
    code, config_text = source_key(), (ROOT / config).read_text()
    timing = []
    for rep in range(reps):
        for q in range(first + 1, doc["until"]):
            folder = period_folder(work, q, doc.get("events", 1.0))
            split = ["--set", f"split.test_from={doc['datasets'][str(q)]['test_from']}"]
            key = {"data": doc["datasets"][str(q)]["key"], "seed": seed, "timing_rep": rep,
                   "code": code, "config": config_text}  # fmt: skip
            rec = {"period": q, "rep": rep, "variants": {}, "in_process": {}}
            full = run(
                [*base, *split, "--seed", str(seed), "--data", str(folder)],
                {**key, "kind": "full", "sets": doc["sets"]},
                work / "timing" / f"full-p{q}-r{rep}",
            )
            rec["full"], rec["in_process"]["full"] = full["seconds"], full["train_seconds"]
            for name, sets in doc["variants"].items():
                src = (
                    work
                    / f"s{seed}"
                    / (f"{warm_folder(sets)}-p{q - 1}" if q - 1 > first else f"full-p{first}")
                )
                warm = run(
                    [*CSMF, "train", "--from", str(src), "--data", str(folder), *split,
                     "--set", "train.threads=1", *(x for s in sets for x in ("--set", s))],
                    {**key, "kind": "warm", "warm_sets": sets,
                     "from": json.loads((src / KEY_FILE).read_text())},
                    work / "timing" / f"{warm_folder(sets)}-p{q}-r{rep}",
                )  # fmt: skip
                rec["variants"][name] = warm["seconds"]
                rec["in_process"][name] = warm["train_seconds"]
            timing.append(rec)
            print(f"timing rep {rep} q {q}: {rec}", flush=True)
    return timing


def paired(rows: list[dict], name: str, base: str | None = None) -> dict:
    """Per (seed, update) pair: the mean over the four metrics of variant ÷ base − 1 (base: the
    full retrain, or the variant named ``base``), and the update's wall time as a fraction of
    the base's; their mean, 95 % CI, worst, and how many pairs are >= 0."""

    def of(r: dict) -> dict:
        return r["full"] if base is None else r["variants"][base]

    rel = [
        float(np.mean([r["variants"][name]["metrics"][t][m] / of(r)["metrics"][t][m] - 1
                       for t, m in METRICS]))
        for r in rows
    ]  # fmt: skip
    per_metric = {
        (t, m): float(np.mean([r["variants"][name]["metrics"][t][m] / of(r)["metrics"][t][m] - 1
                               for r in rows]))
        for t, m in METRICS
    }  # fmt: skip
    time_frac = [r["variants"][name]["seconds"] / of(r)["seconds"] for r in rows]
    in_process = [r["variants"][name]["train_seconds"] / of(r)["train_seconds"] for r in rows]
    n = len(rel)
    half = stats.t.ppf(0.975, n - 1) * np.std(rel, ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return {
        "n": n, "mean": float(np.mean(rel)), "ci": float(half), "worst": float(min(rel)),
        "at_least": sum(x >= 0 for x in rel), "per_metric": per_metric,
        "time": float(np.mean(time_frac)), "time_worst": max(time_frac),
        "in_process": float(np.mean(in_process)),
    }  # fmt: skip


def _name(t: str, m: str) -> str:
    return f"{t} {'Recall' if m == 'recall' else 'nDCG'}@50"


def _on_half(row: dict, half: str) -> dict:
    """``row`` with every run's metrics those of one half of the test users."""

    def of(result: dict) -> dict:
        return {**result, "metrics": {t: result["halves"][half][t] for t in TARGETS}}

    return {
        **row,
        "full": of(row["full"]),
        "variants": {n: of(v) for n, v in row["variants"].items()},
    }


def render(doc: dict, command: str, out: Path) -> None:
    report = doc.get("report", "all")
    rows = doc["rows"] if report == "all" else [_on_half(r, report) for r in doc["rows"]]
    periods = sorted({r["period"] for r in rows})
    names = list(doc["variants"])

    def stat(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values))

    first, until = doc["first"], doc["until"]
    lines = [
        run_line(doc["run"]),
        "",
        f"Code key {doc['code_key']}; seeds {doc['seeds']}; one torch thread per run under `nice` "
        f"on a shared 2-core box. Initial model on periods 1..{first}; updates q = "
        f"{first + 1}..{until - 1}, each evaluated on period q + 1. Variants (warm-start `--set` "
        "overrides): " + "; ".join(f"**{n}** `{' '.join(s) or '(config defaults)'}`"
                                   for n, s in doc["variants"].items()) + ".",
        "",
        "## Against the full retrain, paired per (seed, update)",
        "",
        *(
            [f"**Quality on the {report} half of the test users** (by a hash of the user id; "
             f"the other half {'chose' if report == 'test' else 'reports'}): in every table "
             "below but the one by test user.", ""]
            if report != "all" else []
        ),
        "Quality = the mean over the four metrics (click and conversion fused Recall@50 / "
        "nDCG@50) of variant ÷ full − 1, per pair; mean with its 95 % t-interval over the pairs. "
        "Time = the update command's wall seconds ÷ the full retrain's; in-process = the same "
        "for the seconds inside the train function (load, encode, train, save: the command less "
        "starting Python and importing torch, a fixed few seconds that a larger log dilutes).",
        "",
    ]  # fmt: skip
    summary = {n: paired(rows, n) for n in names}
    lines += table(
        ["variant", "pairs", "quality vs full", "95 % CI", "worst pair",
         *(_name(t, m) for t, m in METRICS), "time, % of full", "worst time", "in-process"],
        [[n, s["n"], f"{s['mean']:+.1%}", f"±{s['ci']:.1%}", f"{s['worst']:+.1%}",
          *(f"{s['per_metric'][k]:+.1%}" for k in METRICS),
          f"{s['time']:.1%}", f"{s['time_worst']:.1%}", f"{s['in_process']:.1%}"]
         for n, s in summary.items()],
        "lrrrrrrrrrrr",
    )  # fmt: skip
    if len(names) > 1:
        first = names[0]
        lines += [
            "",
            f"Against **{first}**, paired the same way (pairs where the variant is at least as "
            "good):",
            "",
        ]
        vs = {n: paired(rows, n, first) for n in names[1:]}
        lines += table(
            ["variant", "pairs", f"quality vs {first}", "95 % CI", "pairs >= 0",
             *(_name(t, m) for t, m in METRICS)],
            [[n, s["n"], f"{s['mean']:+.1%}", f"±{s['ci']:.1%}", s["at_least"],
              *(f"{s['per_metric'][k]:+.1%}" for k in METRICS)] for n, s in vs.items()],
            "lrrrrrrrr",
        )  # fmt: skip
    if doc.get("timing"):
        tm = doc["timing"]
        reps = len({r["rep"] for r in tm})
        lines += [
            "",
            f"### Wall time, back to back ({reps} repetition{'s' if reps > 1 else ''}, seed "
            f"{doc['seeds'][0]})",
            "",
            "The chains above run two seeds at once on a shared machine, so their times carry "
            "the load of the moment; here each update's full retrain and warm starts ran one "
            "at a time, alternating, so each ratio compares runs seconds apart.",
            "",
        ]
        if "timing_run" in doc:
            lines += [f"`{doc['timing_run']['command']}`", "", run_line(doc["timing_run"]), ""]
        body = []
        for q in sorted({r["period"] for r in tm}):
            rs = [r for r in tm if r["period"] == q]

            def secs(values: list[float]) -> str:
                return pm(stat(values), ".1f") if reps > 1 else f"{values[0]:.1f}"

            cells = []
            for n in names:
                frac = [r["variants"][n] / r["full"] for r in rs]
                cells += [secs([r["variants"][n] for r in rs]), f"{np.mean(frac):.1%}"]
            body.append([q, secs([r["full"] for r in rs]), *cells])
        cells = []
        for n in names:
            cells += ["", f"**{np.mean([r['variants'][n] / r['full'] for r in tm]):.1%}**"]
        body.append(["all", "", *cells])
        if all("in_process" in r for r in tm):  # timings from before it was recorded: none
            cells = []
            for n in names:
                frac = [r["in_process"][n] / r["in_process"]["full"] for r in tm]
                cells += ["", f"{np.mean(frac):.1%}"]
            body.append(["all, in-process", "", *cells])
        header = ["q", "full retrain s"]
        for n in names:
            header += [f"{n} s", "% of full"]
        lines += table(header, body, "r" * len(header))
    if all("groups" in r["full"] for r in rows):
        lines += ["", "## By test user", ""]
        lines += [
            "Test users of update q: **new** (first seen in period q), **active** (seen before q "
            "and in it), **stale** (seen before q, not in it). Mean over every (seed, update) of "
            "each group's fused metric, and its ratio to the full retrain's mean; users = test "
            "users per update, mean.",
            "",
        ]
        body = []
        for g in GROUPS:
            for t, m in METRICS:
                f = float(np.mean([r["full"]["groups"][g][t][m] for r in rows]))
                users = np.mean([r["full"]["groups"][g]["users"][t] for r in rows])
                cells = []
                for n in names:
                    v = float(np.mean([r["variants"][n]["groups"][g][t][m] for r in rows]))
                    cells += [f"{v:.4f}", f"{v / f - 1:+.1%}" if f > 0 else ""]
                body.append([g, _name(t, m), f"{users:.0f}", f"{f:.4f}", *cells])
        header = ["group", "metric", "users", "full retrain"]
        for n in names:
            header += [n, "vs full"]
        lines += table(header, body, "llr" + "r" * (len(header) - 3))
    lines += [
        "",
        "## Per update",
        "",
        "Mean ± std over seeds; time = wall seconds of the update command.",
        "",
    ]
    body = []
    for q in periods:
        rs = [r for r in rows if r["period"] == q]
        for t, m in METRICS:
            f = stat([r["full"]["metrics"][t][m] for r in rs])
            cells = []
            for n in names:
                v = stat([r["variants"][n]["metrics"][t][m] for r in rs])
                cells += [pm(v), f"{v[0] / f[0] - 1:+.1%}"]
            body.append([q, _name(t, m), pm(f), *cells])
        f = stat([r["full"]["seconds"] for r in rs])
        cells = []
        for n in names:
            v = stat([r["variants"][n]["seconds"] for r in rs])
            cells += [pm(v, ".1f"), f"{v[0] / f[0]:.1%}"]
        body.append([q, "update seconds", pm(f, ".1f"), *cells])
    header = ["q", "metric", "full retrain"]
    for n in names:
        header += [n, "vs full"]
    lines += table(header, body, "rl" + "r" * (len(header) - 2))
    lines += [
        "",
        "Datasets (entities seen up to q; test = period q + 1's events of known users and items):",
        "",
    ]
    lines += table(
        ["q", "events 1..q", "test events", "users", "items"],
        [[q, d["events"], d["test_events"], d["users"], d["items"]]
         for q, d in doc["datasets"].items()],
        "rrrrr",
    )  # fmt: skip
    reading = out.with_name(out.name + "-reading.md")
    if reading.exists():  # what the numbers say, written after reading them
        lines += ["", "## What it says", "", reading.read_text().strip()]
    data = Path(doc.get("config", "configs/ml-100k.toml")).stem  # the config names the data
    title = f"Warm starts against full retrains ({'ML-100K' if data == 'ml-100k' else data}, "
    title += "ten periods"
    events = doc.get("events", 1.0)
    if events < 1.0:
        title += f" of the earliest {events:.0%} of the events; validation window)"
    else:
        title += ")" if until == PERIODS else f"; validation window, periods 1..{until})"
    write_results(out, title, command, lines, doc)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
