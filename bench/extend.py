"""A fourth objective added to a trained cascade, against a model trained for it alone.

On synthetic data with the optional fourth label (``csmf data synthetic --cart 0.3``: 'carted',
a part of the clicks), per seed:

- **paper**: the 3-stage cascade of ``configs/synthetic.toml`` (the last stage keeps its units);
- **base**: the same with ``cascade.last_tau`` (the last stage frees units for later);
- **extended**: ``csmf extend base --objective cart --label carted`` (stage 3 on the freed units);
- **dedicated**: a 1-stage model on carts alone, the same towers and budget as stage 3.

Reported: cart Recall@50 / nDCG@50 of the extended model's cart view and fused score against the
dedicated model; what ``last_tau`` costs the first three objectives (base against paper, fused
click and conversion); that the extension left them bit-identical (base's and extended's click
and conversion metrics are equal to every digit). Every run folder carries the key of what made
it and is reused only when that key matches.

    csmf data synthetic --out data/synth-cart --users 4000 --items 2000 --exposures 200000 \\
        --candidates-per-request 4 --cart 0.3 --seed 0
    python bench/extend.py --data data/synth-cart --seeds 0 1 2 --jobs 3
    python bench/extend.py --render-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.harness.cache import bench_fingerprint, holds, remember, source_key
from csmf.results import finish_run, pm, run_info, run_line, script_command, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CSMF = [sys.executable, "-m", "csmf.cli"]
METRICS = ("recall", "ndcg")


def run(cmd: list[str], key: dict, out: Path) -> dict:
    """The command into ``out`` (unless ``out`` holds a run made with ``key``), then ``csmf
    eval``; returns eval.json's metrics and the run's seconds."""
    if not holds(out, key):
        subprocess.run([*cmd, "--out", str(out), "--force", "--no-progress"], check=True, cwd=ROOT)
        subprocess.run(
            [*CSMF, "eval", "--run", str(out)], check=True, cwd=ROOT, capture_output=True
        )
        remember(out, key)
    ev = json.loads((out / "eval.json").read_text())
    train = json.loads((out / "train_metrics.json").read_text())
    val = train["stages"][-1]["val_recall"]  # the last stage's view on validation
    return {"metrics": ev["metrics"], "users": ev["users"], "seconds": train["seconds"],
            "output_slices": train["output_slices"],
            "val_recall": val.get("recovered", val.get("trained"))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/synth-cart"))
    ap.add_argument("--config", type=Path, default=Path("configs/synthetic.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--last-tau", type=float, default=0.1)
    ap.add_argument(
        "--cart-epochs", type=int, nargs="+", default=[8, 20, 40],
        help="epochs tried for stage 3 and for the dedicated model; each picks its own by "
        "validation Recall@50 (mean over seeds)",
    )  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("runs/extend"))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "extend-synthetic")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        doc = json.loads(args.out.with_name(args.out.name + ".json").read_text())
        render(doc, doc["command"], args.out)
        return
    command = script_command(__file__)
    info = run_info(ROOT, ("csmf", "trainer"))
    common = {"code": source_key(), "config": args.config.read_text(),
              "data": bench_fingerprint(args.data)}  # fmt: skip
    train = [*CSMF, "train", "--config", str(args.config), "--data", str(args.data),
             "--set", "train.threads=1"]  # fmt: skip

    def one_seed(seed: int) -> dict:
        w = args.work / f"s{seed}"
        key = {**common, "seed": seed}
        paper = run([*train, "--seed", str(seed)], {**key, "kind": "paper"}, w / "paper")
        tau = ["--set", f"cascade.last_tau={args.last_tau}"]
        base = run(
            [*train, "--seed", str(seed), *tau],
            {**key, "kind": "base", "tau": args.last_tau},
            w / "base",
        )
        extended, dedicated = {}, {}
        for e in args.cart_epochs:
            extended[str(e)] = run(
                [*CSMF, "extend", str(w / "base"), "--objective", "cart", "--label", "carted",
                 "--data", str(args.data), "--set", f"train.epochs=[3,5,8,{e}]"],
                {**key, "kind": "extended", "tau": args.last_tau, "epochs": e},
                w / f"extended-{e}",
            )  # fmt: skip
            single = [
                "--set", "cascade.objectives=['cart']", "--set", "cascade.labels={cart='carted'}",
                "--set", f"train.epochs={e}", "--set", "eval.weights=[1.0]",
                "--set", "train.history='others'", "--set", "train.history_dropout=0.5",
            ]  # fmt: skip
            dedicated[str(e)] = run(
                [*train, "--seed", str(seed), *single],
                {**key, "kind": "dedicated", "epochs": e},
                w / f"dedicated-{e}",
            )
        print(f"seed {seed} done", flush=True)
        return {"seed": seed, "paper": paper, "base": base, "extended": extended,
                "dedicated": dedicated}  # fmt: skip

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one_seed, args.seeds))
    doc = {
        "run": finish_run(info),
        "code_key": common["code"],
        "seeds": args.seeds,
        "last_tau": args.last_tau,
        "cart_epochs": args.cart_epochs,
        "rows": rows,
    }
    render(doc, command, args.out)


def _stat(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs))


def render(doc: dict, command: str, out: Path) -> None:
    rows = doc["rows"]
    epochs = [str(e) for e in doc["cart_epochs"]]
    chosen = {  # each model's stage-3 / only-stage epochs, by mean validation Recall@50
        kind: max(epochs, key=lambda e, k=kind: np.mean([r[k][e]["val_recall"] for r in rows]))
        for kind in ("extended", "dedicated")
    }

    def pick(r: dict, kind: str) -> dict:
        return r[kind][chosen[kind]] if kind in chosen else r[kind]

    def ms(kind: str, target: str, ranker: str, m: str) -> tuple[float, float]:
        xs = [pick(r, kind)["metrics"][target][ranker][m] for r in rows]
        return float(np.mean(xs)), float(np.std(xs))

    header = (
        f"{run_line(doc['run'])} Code key {doc['code_key']}, seeds {doc['seeds']}, one torch "
        "thread per run"
        if "run" in doc  # results made before csmf.results.run_info: commit and load after only
        else f"Commit {doc['commit']} (code key {doc['code_key']}), seeds {doc['seeds']}, one "
        f"torch thread per run on a shared 2-core box (load average after: "
        f"{', '.join(f'{x:.1f}' for x in doc['load_after'])})"
    )
    lines = [
        f"{header}; `cascade.last_tau` = "
        f"{doc['last_tau']}; output slices of the extended model "
        f"{pick(rows[0], 'extended')['output_slices']} (exposure, click, conversion, cart).",
        "",
        "Epochs of the cart stage (extended) and of the dedicated model, each chosen on "
        "validation cart Recall@50 (mean over seeds; the test split is not read to choose):",
        "",
        *table(
            ["epochs", "extended: val Recall@50", "dedicated: val Recall@50"],
            [
                [
                    e,
                    *(
                        pm(_stat([r[k][e]["val_recall"] for r in rows]))
                        for k in ("extended", "dedicated")
                    ),
                ]
                for e in epochs
            ],
            "rrr",
        ),
        "",
        f"Chosen: extended {chosen['extended']}, dedicated {chosen['dedicated']} epochs.",
        "",
        "**The new objective** (test carts; mean ± std over seeds):",
        "",
    ]
    body = []
    for label, kind, ranker in (
        ("extended: cart view", "extended", "cart"),
        ("extended: fused (paper weights, cart 1)", "extended", "fused"),
        ("dedicated cart-only model", "dedicated", "cart"),
        ("popularity (clicks)", "dedicated", "popularity (clicks)"),
    ):
        body.append([label, *(pm(ms(kind, "cart", ranker, m)) for m in METRICS)])
    lines += table(["model", "cart Recall@50", "cart nDCG@50"], body, "lrr")
    lines += ["", "**What it costs the first three objectives** (fused score):", ""]
    body = []
    for label, kind in (("paper (last stage keeps its units)", "paper"),
                        (f"base (last_tau {doc['last_tau']})", "base"),
                        ("extended", "extended")):  # fmt: skip
        body.append(
            [
                label,
                *(pm(ms(kind, t, "fused", m)) for t in ("click", "conversion") for m in METRICS),
            ]
        )
    lines += table(
        ["model", "click Recall@50", "click nDCG@50", "conversion Recall@50", "conversion nDCG@50"],
        body,
        "lrrrr",
    )
    same = all(
        r["base"]["metrics"][t][v] == x["metrics"][t][v]
        for r in rows
        for x in r["extended"].values()
        for t in ("click", "conversion")
        for v in ("exposure", "click", "conversion")
    ) and all(
        r["base"]["metrics"][t][v] == pick(r, "extended")["metrics"][t][v]
        for r in rows
        for t in ("click", "conversion")
        for v in ("exposure", "click", "conversion")
    )
    lines += [
        "",
        "Every view of the three first objectives scores the same in base and extended, to every "
        f"digit of eval.json: {'yes' if same else 'NO'} (the extension proved it bit for bit "
        "before writing).",
    ]
    write_results(
        out, "A fourth objective added to a trained cascade (synthetic)", command, lines, doc
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
