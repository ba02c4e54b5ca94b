"""Sensitivity of CSMF (paper Figs. 4-5), scored on the VALIDATION split only.

    csmf bench sensitivity sweep --data data/ml-100k --key cascade.tau \
        --values 0.25,0.5,0.75,0.85,0.95 --seeds 2 [--set cascade.pruning=fixed]
    csmf bench sensitivity weights --data data/ml-100k --seeds 2
    csmf bench sensitivity plot --data data/ml-100k

``sweep`` trains one cascade per (value, seed) and records, besides validation Recall/nDCG@N of
every view and the fused score, what the pruning did (units kept/freed per layer and stage, the
final ``[d|o|r]`` output slices) — the evidence for "capacity per slice" questions. ``weights``
trains once per seed and scores many fused weight triplets on the same vectors: each coefficient
is varied over ``--values`` with the others held at the config's ``eval.weights``. ``plot`` draws
PNGs from the JSON files (matplotlib, the ``bench`` extra).

Results go to ``bench/results/sensitivity-<dataset>.json|.md`` (sweeps; a rerun of a setting
replaces its point) and ``weights-<dataset>.json|.md``. The test split is never read here: it
is reserved for ``csmf bench quality``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

import csmf.objectives as funnel
from csmf.checkpoint import new_model
from csmf.cli import Seeds, fail, invoked_command, new_app
from csmf.errors import CsmfError
from csmf.results import pm, table, write_results
from trainer.cascade import run_cascade
from trainer.config import load_config
from trainer.evaluate import encode_all, evaluate_vectors, fused_ranker, view_ranker
from trainer.pipeline import prepare

app = new_app(no_args_is_help=True, help=__doc__.split("\n")[0])

TARGETS = funnel.TARGETS
RANKERS = (*funnel.NAMES, "fused")  # the views of a full-funnel cascade, then the fused score


def train_val(config: Path, data: Path, overrides: list[str], seed: int, grid=None) -> dict:
    """Train one cascade; validation metrics of every view, fused and each ``grid`` triplet."""
    cfg = load_config(config, [*overrides, f"train.seed={seed}"])
    enc = prepare(cfg, data)
    torch.manual_seed(seed)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    start = time.perf_counter()
    trained = run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
    seconds = time.perf_counter() - start
    rankers = {o: view_ranker(model, t) for t, o in enumerate(cfg.objectives)}
    rankers["fused"] = fused_ranker(model, cfg.eval.weights)
    for w in grid or []:
        rankers[_label(w)] = fused_ranker(model, w)
    e, v = encode_all(model, enc)
    res = evaluate_vectors(e, v, rankers, enc, cfg.eval.n, enc.split.val)
    return {
        "seed": seed,
        "seconds": seconds,
        "metrics": res["metrics"],
        "output_slices": trained["output_slices"],
        "stages": [
            {k: s[k] for k in ("objective", "val_recall", "slices") if k in s}
            for s in trained["stages"]
        ],
        "n": cfg.eval.n,
        "weights": list(cfg.eval.weights),
        "objectives": list(cfg.objectives),
    }


def _label(weights) -> str:
    return "<" + ",".join(f"{w:g}" for w in weights) + ">"


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None


def mean_std(records: list[dict], target: str, ranker: str, metric: str = "recall") -> tuple:
    vals = np.array([r["metrics"][target][ranker][metric] for r in records])
    return float(vals.mean()), float(vals.std())


def sweep_title(points: list[dict]) -> str:
    n = points[0]["runs"][0]["n"] if points else 50
    return f"CSMF sensitivity (validation split, Recall@{n} clicks / conversions)"


def sweep_markdown(points: list[dict]) -> list[str]:
    rows = []
    for p in points:
        cells = []
        for r in RANKERS:
            c, v = (mean_std(p["runs"], t, r)[0] for t in TARGETS)
            cells.append(f"{c:.4f} / {v:.4f}")
        slices = "; ".join("/".join(map(str, r["output_slices"])) for r in p["runs"])
        seeds = ",".join(str(r["seed"]) for r in p["runs"])
        rows.append([p["setting"], seeds, *cells, slices])
    head = ["setting", "seeds", *RANKERS, "output [d/o/r]"]
    commands = dict.fromkeys(p["command"] for p in points if p.get("command"))
    return [
        *table(head, rows),
        "",
        "Means over the seeds listed; output [d/o/r] = output dims owned by exposure / click / "
        "conversion, one entry per seed. The points were made by (a rerun of a setting replaces "
        "its point):",
        "",
        *(f"- `{c}`" for c in commands),
    ]


@app.command("sweep")
def sweep(
    ctx: typer.Context,
    key: Annotated[str, typer.Option("--key", help="section.key to sweep")] = "cascade.tau",
    values: Annotated[str, typer.Option("--values", help="comma-separated")] = "0.25,0.5,0.75,0.95",
    data: Annotated[Path, typer.Option("--data")] = Path("data/ml-100k"),
    config: Annotated[Path | None, typer.Option("--config")] = None,
    seeds: Seeds = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="fixed override, section.key=value"),
    ] = None,
    out: Annotated[Path, typer.Option("--out")] = Path("bench/results"),
) -> None:
    """Train one cascade per value and seed; record validation metrics and slice sizes."""
    dataset = data.resolve().name
    config = config or Path(f"configs/{dataset}.toml")
    base = list(set_ or [])
    path = out / f"sensitivity-{dataset}.json"
    command = invoked_command(ctx)
    points = json.loads(path.read_text())["points"] if path.exists() else []
    try:
        for value in values.split(","):
            override = f"{key}={value.strip()}"
            setting = " ".join([*base, override])
            load_config(config, [*base, override])  # fail before training on a bad value
            runs = []
            for seed in range(seeds):
                rec = train_val(config, data, [*base, override], seed)
                runs.append(rec)
                m = rec["metrics"]
                typer.echo(
                    f"{setting} seed {seed}: fused val Recall@{rec['n']} "
                    + "/".join(f"{m[t]['fused']['recall']:.4f}" for t in TARGETS)
                    + f", slices {rec['output_slices']} ({rec['seconds']:.0f}s)"
                )
            point = {"key": key, "value": float(value), "base": base, "setting": setting}
            point["command"] = command
            points = [p for p in points if p["setting"] != setting] + [point | {"runs": runs}]
            doc = {"split": "val", "config": str(config), "points": points}
            body = sweep_markdown(points)
            write_results(path.with_suffix(""), sweep_title(points), command, body, doc)
    except CsmfError as exc:
        fail(exc)
    typer.echo("\n".join(sweep_markdown(points)))


def weight_grid(base: list[float], values: list[float]) -> list[tuple[float, ...]]:
    """Every triplet with one coefficient replaced by each value (others at ``base``), deduped;
    all-zero triplets are skipped (they rank nothing)."""
    grid: list[tuple[float, ...]] = []
    for i in range(len(base)):
        for x in values:
            w = tuple(x if j == i else b for j, b in enumerate(base))
            if any(w) and w not in grid:
                grid.append(w)
    return grid


def weights_title(doc: dict) -> str:
    return (
        f"Fused weight sweep (validation split, Recall@{doc['runs'][0]['n']} clicks / conversions)"
    )


def weights_markdown(doc: dict) -> list[str]:
    objectives, base = doc["objectives"], doc["base"]
    lines = [
        f"Each coefficient varied with the others at {_label(base)} (cascade order "
        f"{', '.join(objectives)}); one trained model per seed, seeds "
        f"{','.join(str(r['seed']) for r in doc['runs'])}.",
        "",
    ]
    for i, name in enumerate(objectives):
        rows = [
            [_label(w), *(pm(mean_std(doc["runs"], t, _label(w))) for t in TARGETS)]
            for w in doc["grid"]
            if all(w[j] == base[j] for j in range(len(base)) if j != i)
        ]
        lines += [f"## k_{name}", "", *table(["weights", "clicks", "conversions"], rows), ""]
    return lines


@app.command("weights")
def weights(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data")] = Path("data/ml-100k"),
    config: Annotated[Path | None, typer.Option("--config")] = None,
    values: Annotated[
        str, typer.Option("--values", help="values each coefficient takes, comma-separated")
    ] = "0,0.5,1,1.2,1.5,1.8,2.5,3.5,5",
    seeds: Seeds = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Config override (repeatable)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out")] = Path("bench/results"),
) -> None:
    """Train once per seed; score a grid of fused weight triplets on the validation split."""
    dataset = data.resolve().name
    config = config or Path(f"configs/{dataset}.toml")
    try:
        cfg = load_config(config, list(set_ or []))
        grid = weight_grid(list(cfg.eval.weights), _floats(values, "--values"))
        runs = []
        for seed in range(seeds):
            runs.append(train_val(config, data, list(set_ or []), seed, grid))
            typer.echo(f"seed {seed}: {len(grid)} triplets scored ({runs[-1]['seconds']:.0f}s)")
    except CsmfError as exc:
        fail(exc)
    doc = {
        "split": "val",
        "config": str(config),
        "overrides": list(set_ or []),
        "objectives": list(cfg.objectives),
        "base": list(cfg.eval.weights),
        "grid": [list(w) for w in grid],
        "runs": runs,
    }
    body = weights_markdown(doc)
    write_results(out / f"weights-{dataset}", weights_title(doc), invoked_command(ctx), body, doc)
    typer.echo("\n".join(body))


def plot_sweeps(points: list[dict], out: Path, dataset: str) -> list[Path]:
    """One PNG per swept key: fused validation Recall vs value, one line per (base, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in sorted({p["key"] for p in points}):
        fig, ax = plt.subplots(figsize=(6, 4))
        series: dict[str, list[dict]] = {}
        for p in points:
            if p["key"] == key:
                series.setdefault(" ".join(p["base"]) or "as configured", []).append(p)
        for base, pts in sorted(series.items()):
            pts = sorted(pts, key=lambda p: p["value"])
            xs = [p["value"] for p in pts]
            for target, style in zip(TARGETS, ("-o", "--s"), strict=True):
                ms = [mean_std(p["runs"], target, "fused") for p in pts]
                ax.errorbar(
                    xs, [m[0] for m in ms], yerr=[m[1] for m in ms], fmt=style, capsize=3,
                    label=f"{target} ({base})",
                )  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel(f"fused val Recall@{points[0]['runs'][0]['n']}")
        ax.set_title(f"{dataset}: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / f"sensitivity-{dataset}-{key.split('.')[-1]}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_weights(doc: dict, out: Path, dataset: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives, base = doc["objectives"], doc["base"]
    fig, axes = plt.subplots(1, len(objectives), figsize=(4 * len(objectives), 3.6), sharey=True)
    for i, (ax, name) in enumerate(zip(np.atleast_1d(axes), objectives, strict=True)):
        grid = [w for w in doc["grid"] if all(w[j] == base[j] for j in range(len(base)) if j != i)]
        grid.sort(key=lambda w: w[i])
        for target, style in zip(TARGETS, ("-o", "--s"), strict=True):
            ms = [mean_std(doc["runs"], target, _label(w)) for w in grid]
            ax.errorbar(
                [w[i] for w in grid], [m[0] for m in ms], yerr=[m[1] for m in ms], fmt=style,
                capsize=3, label=target,
            )  # fmt: skip
        ax.axvline(base[i], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"k_{name} (others at {_label(base)})")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"fused val Recall@{doc['runs'][0]['n']}")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: fused weight sweep")
    fig.tight_layout()
    path = out / f"weights-{dataset}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@app.command("plot")
def plot(
    data: Annotated[Path, typer.Option("--data", help="dataset folder (names the files)")] = Path(
        "data/ml-100k"
    ),
    out: Annotated[Path, typer.Option("--out")] = Path("bench/results"),
) -> None:
    """PNG plots from sensitivity-<dataset>.json and weights-<dataset>.json (whichever exist)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("plotting needs matplotlib: pip install -e '.[bench]'")
    dataset = data.resolve().name
    written = []
    sweeps, wts = out / f"sensitivity-{dataset}.json", out / f"weights-{dataset}.json"
    if sweeps.exists():
        written += plot_sweeps(json.loads(sweeps.read_text())["points"], out, dataset)
    if wts.exists():
        written.append(plot_weights(json.loads(wts.read_text()), out, dataset))
    if not written:
        fail(f"neither {sweeps} nor {wts} exists; run sweep or weights first")
    for p in written:
        typer.echo(f"wrote {p}")


if __name__ == "__main__":
    app()
