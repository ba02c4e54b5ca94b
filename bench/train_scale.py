"""Training at scale: throughput, scaling efficiency, peak RSS and wall time of real
`csmf train` runs (``python -m trainer.cli train``; ``--nproc`` launches torchrun, gloo).

Each section is one command (a heavy job: run them one after another, never two at once) and is
merged into ``bench/results/<name>.json``; the Markdown file is rebuilt from every section:

``throughput``  1 process × T threads vs P processes × 1 thread at the same *global* batch (the
    P-process run gets ``batch_size / P`` per rank), epochs capped by ``--max-steps``:
    examples/s of stage 0 (exposure; every unit trainable) and stage 1 (click; masked fine-tuning
    of the units CPP freed) from the stages' ``train_seconds`` (training steps incl. reading and
    shuffling streamed data; no validation, CPP or checkpoint writes); scaling efficiency =
    P-process ÷ 1-process examples/s; peak RSS per process.
``rss``  peak RSS of 1 process, streamed vs in memory, on each ``--data`` folder (e.g. 1M and
    10M events): streaming's should not grow with the event count, in-memory's does.
``cascade``  one whole cascade (every stage, CPP, AR, validation, checkpoint), no step cap:
    wall time per stage.
``demo``  ML-100K: the default config vs the demo config (``make demo``), wall time of the
    training step and Recall/nDCG@50 on the test split, seed 0.

The load average is recorded with every section (the box is shared; multi-threaded runs suffer
most from other jobs).

    python bench/train_scale.py throughput --data data/synth-10m --config configs/synthetic-large.toml --max-steps 100
    python bench/train_scale.py rss --data data/synth-1m --data data/synth-10m --config configs/synthetic-large.toml
    python bench/train_scale.py cascade --data data/synth-10m --config configs/synthetic-large.toml --procs 2
    python bench/train_scale.py demo --data data/ml-100k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from csmf.results import finish_run, run_info, run_line, script_command, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def train(
    args: argparse.Namespace,
    data: Path,
    config: Path,
    out: Path,
    procs: int,
    threads: int,
    sets: list[str],
) -> dict:
    """One `csmf train` run; its train_metrics.json plus the process wall time."""
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", str(config),
           "--data", str(data), "--out", str(out), "--force", "--no-progress",
           "--set", f"train.threads={threads}"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    if procs > 1:
        cmd += ["--nproc", str(procs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr if args.verbose else None)
    wall = time.perf_counter() - start
    m = json.loads((out / "train_metrics.json").read_text())
    m["process_wall_seconds"] = wall
    return m


def evaluate(out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "trainer.cli", "eval", "--run", str(out)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    return {t: v["fused"] for t, v in result["metrics"].items()}


def throughput(args: argparse.Namespace) -> dict:
    settings = [(1, args.cores), (args.cores, 1)] + ([(1, 1)] if args.with_single else [])
    rows = []
    for k, (procs, threads) in enumerate(settings):
        bs = args.batch_size // procs
        sets = [f"train.batch_size={bs}", f"train.max_steps={args.max_steps}", *args.set]
        m = train(args, args.data[0], args.config, args.runs / f"tp{k}", procs, threads, sets)
        stages = m["stages"]

        rows.append({
            "name": f"{procs} process{'es' if procs > 1 else ''} × {threads} thread"
            + ("s" if threads > 1 else "") + (" (gloo)" if procs > 1 else ""),
            "procs": procs, "threads": threads, "batch_per_rank": bs,
            "stage0_examples_per_s": _rate(stages[0], args.max_steps * args.batch_size),
            "stage1_examples_per_s": _rate(stages[1], args.max_steps * args.batch_size),
            "stage_train_seconds": [s["train_seconds"] for s in stages],
            "positives": [s["positives"] for s in stages],
            "peak_rss_mb": m["peak_rss_mb"], "prepare_seconds": m.get("prepare_seconds"),
            "cascade_seconds": m["seconds"], "process_wall_seconds": m["process_wall_seconds"],
            "data": m.get("data"), "traffic_bytes_per_step": m.get("traffic_bytes_per_step"),
            "id_tables": m.get("id_tables"),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]  # 1 process with every core
    for r in rows:
        r["efficiency_stage0"] = r["stage0_examples_per_s"] / base["stage0_examples_per_s"]
        r["efficiency_stage1"] = r["stage1_examples_per_s"] / base["stage1_examples_per_s"]
    return {"rows": rows, "max_steps": args.max_steps, "batch_size": args.batch_size}


def _rate(stage: dict, cap: int) -> float:
    """Examples/s of a stage's training epochs (each capped at ``cap`` = max_steps × global
    batch examples)."""
    return min(stage["positives"], cap) * len(stage["loss"]) / stage["train_seconds"]


def scale(args: argparse.Namespace) -> dict:
    """Per ``--data`` folder, side by side in each round: `csmf train` with row-wise id tables,
    with dense ones (``--dense-steps`` steps a stage: a dense step at 10M rows takes seconds),
    and the plain reference two-tower (bench/reference_two_tower.py) on the same events."""
    rows = []
    for rnd in range(args.rounds):
        for data in args.data:
            for mode, steps in (("row-wise", args.max_steps), ("dense", args.dense_steps)):
                if steps == 0:
                    continue
                sets = [f"train.id_tables={mode}", f"train.max_steps={steps}",
                        f"train.batch_size={args.batch_size}", *args.set]  # fmt: skip
                out = args.runs / f"scale-{data.name}-{mode}"
                la = os.getloadavg()[0]
                m = train(args, data, args.config, out, 1, args.threads, sets)
                st = m["stages"]
                rows.append({
                    "round": rnd, "data": data.name, "users": m.get("n_users"),
                    "trainer": f"csmf, {mode} id tables", "steps": steps, "load": la,
                    "stage_examples_per_s": [_rate(x, steps * args.batch_size) for x in st],
                    "data_wait_share": [x.get("data_wait_seconds", 0) / x["train_seconds"]
                                        for x in st],
                    "peak_rss_mb": m["peak_rss_mb"][0], "id_tables": m.get("id_tables"),
                    "prepare_seconds": m.get("prepare_seconds"),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            la = os.getloadavg()[0]
            ref = reference(data, args.max_steps, args.batch_size, args.threads)
            rows.append({
                "round": rnd, "data": data.name, "trainer": "reference two-tower (sparse)",
                "steps": args.max_steps, "load": la,
                "stage_examples_per_s": [ref["examples_per_s"]], "data_wait_share": None,
                "peak_rss_mb": ref["peak_rss_mb"], "id_tables": None, "prepare_seconds": None,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "max_steps": args.max_steps, "dense_steps": args.dense_steps,
            "batch_size": args.batch_size, "threads": args.threads,
            "datasets": {d.name: _dataset(d) for d in args.data}}  # fmt: skip


def reference(data: Path, steps: int, batch_size: int, threads: int) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "reference_two_tower.py"), "--data", str(data),
           "--steps", str(steps), "--batch-size", str(batch_size), "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss(args: argparse.Namespace) -> dict:
    rows = []
    for data in args.data:
        for mode in ("stream", "memory"):
            sets = [f'train.data="{mode}"', f"train.max_steps={args.max_steps}", *args.set]
            out = args.runs / f"rss-{data.name}-{mode}"
            m = train(args, data, args.config, out, 1, args.threads, sets)
            rows.append({
                "data": str(data), "events": _events(data), "mode": mode,
                "peak_rss_mb": m["peak_rss_mb"][0], "prepare_seconds": m.get("prepare_seconds"),
                "process_wall_seconds": m["process_wall_seconds"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "max_steps": args.max_steps, "threads": args.threads}


def cascade(args: argparse.Namespace) -> dict:
    procs, threads = args.procs, (1 if args.procs > 1 else args.threads)
    sets = [f"train.batch_size={args.batch_size // procs}", *args.set]
    m = train(args, args.data[0], args.config, args.runs / "cascade", procs, threads, sets)
    return {
        "procs": procs, "threads": threads, "batch_size": args.batch_size,
        "seconds": m["seconds"], "process_wall_seconds": m["process_wall_seconds"],
        "prepare_seconds": m.get("prepare_seconds"), "peak_rss_mb": m["peak_rss_mb"],
        "stages": [
            {k: s.get(k) for k in ("objective", "positives", "seconds", "train_seconds",
                                   "val_recall")}
            for s in m["stages"]
        ],
        "epochs": m["config"]["train"]["epochs"], "ar_epochs": m["config"]["train"]["ar_epochs"],
        "rho": m["config"]["cascade"]["rho"], "output_slices": m["output_slices"],
    }  # fmt: skip


def demo(args: argparse.Namespace) -> dict:
    config = ROOT / "configs" / "ml-100k.toml"
    rows = []
    for name, sets in (("make demo", demo_sets()), ("full config (make demo FULL=1)", [])):
        out = args.runs / f"demo-{len(rows)}"
        m = train(args, args.data[0], config, out, 1, args.threads, sets + list(args.set))
        rows.append({
            "name": name, "config": "configs/ml-100k.toml " + " ".join(f"--set {x}" for x in sets),
            "seconds": m["seconds"],
            "process_wall_seconds": m["process_wall_seconds"], "threads": args.threads,
            "fused": evaluate(out),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def demo_sets() -> list[str]:
    """The Makefile's DEMO_SET (``--set a=b --set c=d``) as ["a=b", "c=d"]."""
    import re

    line = re.search(r"^DEMO_SET \?=(.*)$", (ROOT / "Makefile").read_text(), re.M)
    return re.findall(r"--set\s+(\S+)", line.group(1)) if line else []


def _events(data: Path) -> int:
    from trainer.data.stream import count_events

    return count_events(data)


def _dataset(data: Path) -> dict:
    meta = data / "dataset.json"
    return json.loads(meta.read_text()).get("counts", {}) if meta.exists() else {}


def render(doc: dict) -> list[str]:
    lines = [_HEAD, ""]
    s = doc.get("throughput")
    if s:
        lines += [
            "## Throughput: 1 process × 2 threads vs 2 processes × 1 thread (gloo)", "",
            f"`{s['command']}`", "",
            f"Dataset {_counts(s['dataset'])}; streamed; every epoch capped at {s['max_steps']} steps of "
            f"the global batch {s['batch_size']}; {_machine(s)}.", "",
        ]  # fmt: skip
        lines += table(
            ["setting", "stage 0 ex/s", "stage 1 (masked) ex/s", "efficiency s0 / s1",
             "peak RSS MB / proc", "prepare s", "cascade s", "process wall s"],
            (
                [r["name"], f"{r['stage0_examples_per_s']:,.0f}",
                 f"{r['stage1_examples_per_s']:,.0f}",
                 f"{r['efficiency_stage0']:.2f} / {r['efficiency_stage1']:.2f}",
                 ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"]), f"{r['prepare_seconds']:.0f}",
                 f"{r['cascade_seconds']:.0f}", f"{r['process_wall_seconds']:.0f}"]
                for r in s["rows"]
            ),
            "lrrrrrrr",
        )  # fmt: skip
        lines += [
            "",
            "Efficiency = examples/s ÷ the 1-process row's (same cores). `cascade s` = every "
            "stage with its capped epoch, CPP, AR, validation and checkpoints; `prepare s` = the "
            "streaming passes (counts, split cut-offs, statistics). Each rank's in-batch "
            "negatives are its own rows (batch_size / P per rank), so P processes compute P× "
            "fewer softmax logits per example than one process with the whole batch: part of "
            "an efficiency above 1 is that, not parallelism.",
            "",
        ]
        lines += _traffic(s["rows"])
    s = doc.get("scale")
    if s:
        lines += _render_scale(s)
    s = doc.get("rss")
    if s:
        lines += [
            "## Peak RSS: streamed vs in memory", "", f"`{s['command']}`", "",
            f"1 process × {s['threads']} thread(s), every epoch capped at {s['max_steps']} steps "
            f"(RSS is set by loading/encoding and the model, not by the number of steps); "
            f"{_machine(s)}.", "",
        ]  # fmt: skip
        lines += table(
            ["events", "mode", "peak RSS MB", "prepare s", "process wall s"],
            (
                [f"{r['events']:,}", r["mode"], f"{r['peak_rss_mb']:,.0f}",
                 f"{r['prepare_seconds']:.0f}", f"{r['process_wall_seconds']:.0f}"]
                for r in s["rows"]
            ),
            "rlrrr",
        )  # fmt: skip
        lines.append("")
    s = doc.get("cascade")
    if s:
        lines += [
            "## One whole cascade", "", f"`{s['command']}`", "",
            f"Dataset {s['dataset']}; {s['procs']} process(es) × {s['threads']} thread(s), "
            f"global batch {s['batch_size']}, epochs {s['epochs']} per stage, AR {s['ar_epochs']} "
            f"epoch(s) on rho = {s['rho']} of a stage's positives; {_machine(s)}.", "",
            f"Whole cascade {s['seconds']:.0f} s (process {s['process_wall_seconds']:.0f} s, of "
            f"which {s['prepare_seconds']:.0f} s preparing the data), peak RSS "
            f"{', '.join(f'{x:.0f}' for x in s['peak_rss_mb'])} MB per process; output slices "
            f"{s['output_slices']}.", "",
        ]  # fmt: skip
        lines += table(
            ["stage", "positives", "train s", "stage s (incl. CPP, AR, validation)",
             "val Recall@50"],
            (
                [st["objective"], f"{st['positives']:,}", f"{st['train_seconds']:.0f}",
                 f"{st['seconds']:.0f}",
                 " → ".join(f"{k} {v:.4f}" for k, v in (st["val_recall"] or {}).items())]
                for st in s["stages"]
            ),
            "lrrrl",
        )  # fmt: skip
        lines.append("")
    s = doc.get("demo")
    if s:
        lines += [
            "## ML-100K: `make demo`'s training vs the full config", "", f"`{s['command']}`", "",
            f"1 process × {s['rows'][0]['threads']} thread(s), seed 0; fused score "
            f"⟨1, 1.8, 1.2⟩ on the test split; {_machine(s)}.", "",
        ]  # fmt: skip
        lines += table(
            ["run", "train wall s", "click R@50", "click nDCG@50", "conv R@50", "conv nDCG@50"],
            (
                [f"{r['name']}: `{r['config']}`", f"{r['process_wall_seconds']:.0f}",
                 f"{r['fused']['click']['recall']:.4f}", f"{r['fused']['click']['ndcg']:.4f}",
                 f"{r['fused']['conversion']['recall']:.4f}",
                 f"{r['fused']['conversion']['ndcg']:.4f}"]
                for r in s["rows"]
            ),
            "lrrrrr",
        )  # fmt: skip
        lines.append("")
    return lines


def _render_scale(s: dict) -> list[str]:
    lines = [
        "## Row-wise id tables at two sizes, beside a plain sparse two-tower", "",
        f"`{s['command']}`", "",
        f"1 process × {s['threads']} threads, global batch {s['batch_size']}, streamed; each "
        f"stage's epoch capped at {s['max_steps']} steps ({s['dense_steps']} for dense id "
        f"tables); `load` = the 1-minute load average when the run started; {_machine(s)}.", "",
    ]  # fmt: skip
    for name, counts in s["datasets"].items():
        lines.append(f"- `{name}`: {_counts(counts)}")
    lines.append("")
    if s.get("note"):
        lines += [f"Note: {s['note']}.", ""]
    head = ["round", "data", "trainer", "load", "ex/s exposure", "ex/s click", "ex/s conversion",
            "waiting for data", "peak RSS MB", "tables + optimizer state MB"]  # fmt: skip

    def row(r: dict) -> list[str]:
        rates = [f"{x:,.0f}" for x in r["stage_examples_per_s"]] + ["—"] * 3
        wait = r["data_wait_share"]
        t = r["id_tables"]
        state = f"{(t['table_bytes'] + t['optimizer_state_bytes']) / 2**20:,.0f}" if t else "—"
        return [str(r["round"]), r["data"], r["trainer"], f"{r['load']:.1f}", *rates[:3],
                " / ".join(f"{w:.0%}" for w in wait) if wait else "—",
                f"{r['peak_rss_mb']:,.0f}", state]  # fmt: skip

    lines += table(head, (row(r) for r in s["rows"]), "llllrrrrrr")
    lines += ["", *_scale_targets(s)]
    lines += [
        "",
        "ex/s = examples of a stage's capped epoch ÷ its training seconds (reading and shuffling "
        "streamed data included; validation, CPP and checkpoints not). The reference has one "
        "objective: its rate is in the exposure column. Waiting for data = the share of training "
        "time the step waited for the prefetch thread (per stage).",
        "",
    ]
    return lines


def _counts(counts: dict) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in counts.items()) if counts else "(no dataset.json)"


def _traffic(rows: list[dict]) -> list[str]:
    """Bytes each rank sent per step in gradient collectives, against what a dense all-reduce of
    the id tables would send."""
    out = []
    for r in rows:
        t, ids = r.get("traffic_bytes_per_step"), r.get("id_tables")
        if not t or not ids:
            continue
        out.append(
            f"Communicated per step and rank ({r['name']}): id tables {t['tables'] / 1e3:,.0f} kB "
            f"(the touched rows' indices and values, all-gathered), dense layers "
            f"{t['dense'] / 1e3:,.0f} kB (one flat all-reduce); a dense all-reduce of the id "
            f"tables would send {ids['table_bytes'] / 1e6:,.1f} MB "
            f"({ids['table_bytes'] / max(t['tables'], 1):,.0f}× more)."
        )
    return [*out, ""] if out else []


def _scale_targets(s: dict) -> list[str]:
    """The targets of the row-wise trainer, checked against each round's rows (rounds differ by
    the machine's load, shown beside them): examples/s per stage at the smaller size, the larger
    size within 1.2x of it, peak RSS within 1.5 GB of the id tables and their optimizer state,
    and the plain reference's rate."""
    names = list(s["datasets"])
    if not names:
        return []
    small, large = names[0], names[-1]
    ours, theirs = "csmf, row-wise id tables", "reference two-tower (sparse)"

    def row(rnd: int, data: str, trainer: str) -> dict | None:
        found = [
            r for r in s["rows"] if (r["round"], r["data"], r["trainer"]) == (rnd, data, trainer)
        ]
        return found[0] if found else None

    out = ["**Against the targets** (row-wise id tables), round by round:", ""]
    for rnd in sorted({r["round"] for r in s["rows"]}):
        a, b, ref = row(rnd, small, ours), row(rnd, large, ours), row(rnd, small, theirs)
        if a is None:
            continue
        rates = a["stage_examples_per_s"]
        met = [x >= goal for x, goal in zip(rates, (15_000, 12_000, 12_000), strict=False)]
        parts = [
            f"`{small}` {' / '.join(f'{x:,.0f}' for x in rates)} examples/s (targets 15,000 / "
            f"12,000 / 12,000: {' / '.join('met' if m else 'not met' for m in met)}; load "
            f"{a['load']:.1f})"
        ]
        if ref:
            parts.append(f"{rates[0] / ref['stage_examples_per_s'][0]:.2f}× the plain two-tower")
        if b is not None and len(names) > 1:
            ratios = [x / y for x, y in zip(rates, b["stage_examples_per_s"], strict=True)]
            worst = max(max(r, 1 / r) for r in ratios)
            parts.append(
                f"`{small}` ÷ `{large}` {' / '.join(f'{r:.2f}×' for r in ratios)} (within 1.2×: "
                f"{'met' if worst <= 1.2 else 'not met'}; load {b['load']:.1f})"
            )
        out.append(f"- round {rnd}: " + "; ".join(parts))
    for r in s["rows"]:
        t = r["id_tables"]
        if r["round"] != 0 or not t or not r["trainer"].startswith(ours):
            continue
        budget = (t["table_bytes"] + t["optimizer_state_bytes"]) / 2**20 + 1536
        out.append(
            f"- `{r['data']}` peak RSS {r['peak_rss_mb']:,.0f} MB against the budget {budget:,.0f} "
            f"MB (id tables + optimizer state + 1.5 GB): "
            f"{'met' if r['peak_rss_mb'] <= budget else 'not met'}"
        )
    return [*out, ""]


_HEAD = (
    "Real `csmf train` processes on a shared 2-core box (other agents' jobs ran alongside: the "
    "load average is given per section). Throughput rows of one section ran back to back; "
    "compare ratios within a section, not absolute numbers across sessions."
)


def _machine(s: dict) -> str:
    if "run" in s:  # csmf.results.run_info; sections measured before it: load and date only
        return run_line(s["run"]).removesuffix(".")
    la = s["loadavg"]
    return (
        f"{s['cpus']} cores, load average {la['before'][0]:.1f} before / {la['after'][0]:.1f} "
        f"after (1 min), measured {s['when']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("section", choices=("scale", "throughput", "rss", "cascade", "demo"))
    ap.add_argument("--data", type=Path, action="append", required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic-large.toml")
    ap.add_argument("--batch-size", type=int, default=4096, help="global batch")
    ap.add_argument("--max-steps", type=int, default=100, help="train.max_steps per epoch")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of 1-process runs")
    ap.add_argument("--procs", type=int, default=2, help="cascade: processes")
    ap.add_argument("--with-single", action="store_true", help="throughput: add 1 × 1 thread")
    ap.add_argument("--dense-steps", type=int, default=5, help="scale: steps of dense runs")
    ap.add_argument("--rounds", type=int, default=1, help="scale: rounds of every run")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/csmf-train-scale"))
    ap.add_argument("--name", default="train-scale")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rebuild the Markdown from JSON")
    args = ap.parse_args()
    if args.render_only:
        stem = RESULTS / args.name
        doc = json.loads(stem.with_name(stem.name + ".json").read_text())
        _write(stem, doc, args.name)
        return
    args.data = [d.resolve() for d in args.data]
    info = run_info()
    sections = {"scale": scale, "throughput": throughput, "rss": rss, "cascade": cascade}
    result = {**sections, "demo": demo}[args.section](args)
    result.update(
        command=script_command(__file__),
        dataset=_dataset(args.data[0]),
        run=finish_run(info),
    )
    stem = RESULTS / args.name
    path = stem.with_name(stem.name + ".json")
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.pop("command", None)
    doc[args.section] = result
    _write(stem, json.loads(json.dumps(doc, default=_nan)), args.name)


def _write(stem: Path, doc: dict, name: str) -> None:
    md, _ = write_results(
        stem, f"Training at scale ({name})",
        "python bench/train_scale.py {scale|throughput|rss|cascade|demo} ... (each section below "
        "names its own command)",
        render(doc), doc,
    )  # fmt: skip
    print(md.read_text())


def _nan(x: object) -> object:
    return None if isinstance(x, float) and math.isnan(x) else float(x)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
