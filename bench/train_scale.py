"""Training throughput: 1 process × T threads vs P processes × 1 thread (gloo), same total cores
(issue 14). Each setting is one real `csmf train` (``python -m trainer.cli train``, ``--nproc``
launching torchrun) on the same dataset, config, seed and *global* batch (the P-process run gets
``batch_size / P`` per rank).

Per setting: examples/s of stage 0 (exposure; every unit trainable) and stage 1 (click; masked
fine-tuning of the units CPP freed), from the stages' ``train_seconds`` (training epochs only:
no validation, CPP or checkpoint writes); scaling efficiency = P-process examples/s ÷
1-process × T-thread examples/s (same cores: 1.0 = processes as good as threads), and the
stage-0 speed-up over 1 process × 1 thread; the load average is recorded (shared machines skew
multi-threaded runs most); peak RSS per process;
whole-process wall time; fused Recall@50 on the test split.

    .venv/bin/python bench/train_scale.py --data data/synth --config configs/synthetic.toml

Writes bench/results/train-scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from csmf.results import script_command, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run(setting: dict, args: argparse.Namespace, out: Path) -> dict:
    procs, threads = setting["procs"], setting["threads"]
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", str(args.config),
           "--data", str(args.data), "--out", str(out), "--force", "--no-progress",
           "--set", f"train.threads={threads}", "--set", f"train.epochs={args.epochs}",
           "--set", f"train.ar_epochs={args.ar_epochs}",
           "--set", f"train.batch_size={args.batch_size // procs}"]  # fmt: skip
    if procs > 1:
        cmd += ["--nproc", str(procs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    m = json.loads((out / "train_metrics.json").read_text())
    stages = m["stages"]
    epochs = json.loads(args.epochs)

    def rate(t: int) -> float:
        return stages[t]["positives"] * epochs[t] / stages[t]["train_seconds"]

    ev = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "eval", "--run", str(out)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    fused = {t: v["fused"]["recall"] for t, v in result["metrics"].items()}
    return {
        **setting,
        "batch_per_rank": args.batch_size // procs,
        "stage0_examples_per_s": rate(0),
        "stage1_examples_per_s": rate(1),
        "stage_train_seconds": [s["train_seconds"] for s in stages],
        "positives": [s["positives"] for s in stages],
        "peak_rss_mb": m["peak_rss_mb"],
        "cascade_seconds": m["seconds"],
        "process_wall_seconds": wall,
        "fused_recall": fused,
        "eval_lines": ev.stdout.count("\n"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synth")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic.toml")
    ap.add_argument("--epochs", default="[1,1,1]", help="train.epochs (TOML list)")
    ap.add_argument("--ar-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048, help="global batch")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/csmf-train-scale"))
    ap.add_argument("--name", default="train-scale")
    args = ap.parse_args()
    settings = [
        {"name": "1 process × 1 thread", "procs": 1, "threads": 1},
        {"name": f"1 process × {args.cores} threads", "procs": 1, "threads": args.cores},
        {"name": f"{args.cores} processes × 1 thread (gloo)", "procs": args.cores, "threads": 1},
    ]
    rows = []
    for i, s in enumerate(settings):
        rows.append(run(s, args, args.runs / f"run{i}"))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[1]  # same total cores as the multi-process run
    for r in rows:
        r["efficiency_stage0"] = r["stage0_examples_per_s"] / base["stage0_examples_per_s"]
        r["efficiency_stage1"] = r["stage1_examples_per_s"] / base["stage1_examples_per_s"]
        r["speedup_vs_1_thread"] = r["stage0_examples_per_s"] / rows[0]["stage0_examples_per_s"]
    meta = args.data / "dataset.json"
    dataset = json.loads(meta.read_text()).get("counts", {}) if meta.exists() else {}
    load = os.getloadavg()
    payload = {"dataset": dataset, "rows": rows, "cpus": os.cpu_count(), "loadavg_at_end": load}
    lines = [
        f"Dataset: {dataset}; config {args.config.name}, epochs {args.epochs}, AR epochs "
        f"{args.ar_epochs}, global batch {args.batch_size}; machine: {os.cpu_count()} cores, "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min).",
        "",
    ]
    head = ["setting", "stage 0 ex/s", "stage 1 ex/s", "eff. s0", "eff. s1",
            "s0 speed-up vs 1×1", "peak RSS MB / proc", "cascade s", "wall s",
            "fused R@50 click / conv"]  # fmt: skip
    nan = float("nan")
    lines += table(
        head,
        (
            [r["name"], f"{r['stage0_examples_per_s']:,.0f}", f"{r['stage1_examples_per_s']:,.0f}",
             f"{r['efficiency_stage0']:.2f}", f"{r['efficiency_stage1']:.2f}",
             f"{r['speedup_vs_1_thread']:.2f}", ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"]),
             f"{r['cascade_seconds']:.0f}", f"{r['process_wall_seconds']:.0f}",
             f"{r['fused_recall'].get('click', nan):.4f} / "
             f"{r['fused_recall'].get('conversion', nan):.4f}"]
            for r in rows
        ),
    )  # fmt: skip
    title = f"Training throughput ({args.name})"
    md, _ = write_results(RESULTS / args.name, title, script_command(__file__), lines, payload)
    print("\n".join(lines))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
