"""``csmf tune``: choose objective weights from evidence (paper Fig. 5 made a tool;
docs/design.md#tune-experiment-feedback).

One encode of every user and item of a trained run, then each weight triplet is only a query
scale (``csmf.weights.dim_scale``) scored with the evaluation protocol of ``csmf eval``
(``trainer.evaluate``) on the **validation** split — never the test split, which stays reserved
for the quality table. Two objectives' Recall@N or nDCG@N (default click vs conversion Recall@50)
give each triplet a point; the non-dominated points are the Pareto front. A point is chosen on the
front (``--prefer``: 0 = all for the first objective, 1 = all for the second) and written to
``tune.json`` with a PNG; ``--apply NAME --url ... --token ...`` puts it as a scenario through a
running service's admin API.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import csmf.objectives as funnel
from csmf.errors import CsmfError
from csmf.weights import parse_weights

TUNE_NAME = "tune.json"
PLOT_NAME = "tune.png"
DEFAULT_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)


class TuneError(CsmfError, ValueError):
    """Bad tune options (objective, metric, grid) or a failed --apply."""


def weight_grid(values: Sequence[float], n_objectives: int) -> list[tuple[float, ...]]:
    """Every combination of ``values`` per objective, one triplet per direction: only ratios
    change a ranking, so ⟨1,2,2⟩ and ⟨0.5,1,1⟩ are the same point and the first one is kept;
    all-zero triplets rank nothing and are skipped."""
    out, seen = [], set()
    for w in itertools.product(sorted(set(values)), repeat=n_objectives):
        if not any(w):
            continue
        key = tuple(round(x / max(w), 9) for x in w)
        if key not in seen:
            seen.add(key)
            out.append(tuple(float(x) for x in w))
    return out


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of ``points`` (P, 2), both objectives maximised, in
    order of the first objective. A point is dominated when another is >= on both and > on one;
    exact duplicates are all kept."""
    p = np.asarray(points, dtype=np.float64)
    ge = (p[None, :, :] >= p[:, None, :]).all(-1)  # (P, P): j >= i on both
    gt = (p[None, :, :] > p[:, None, :]).any(-1)  # (P, P): j > i on one
    dominated = (ge & gt).any(1)
    front = np.flatnonzero(~dominated)
    return front[np.argsort(p[front, 0], kind="stable")]


def choose(points: np.ndarray, front: np.ndarray, prefer: float) -> int:
    """The front point maximising (1 - prefer)·x/max x + prefer·y/max y (each objective scaled
    by its best value on the front, so ``prefer`` trades comparable units)."""
    p = points[front]
    scale = np.where(p.max(0) > 0, p.max(0), 1.0)
    score = (1 - prefer) * p[:, 0] / scale[0] + prefer * p[:, 1] / scale[1]
    return int(front[int(np.argmax(score))])


def _label(w: Sequence[float]) -> str:
    return "<" + ",".join(f"{x:g}" for x in w) + ">"


def score_grid(model, enc, grid, objectives, metric, n, rows) -> tuple[np.ndarray, float, float]:
    """Validation metric of the two ``objectives`` for every triplet: (P, 2); also the seconds of
    the one encode and of the scoring."""
    from trainer.evaluate import encode_all, evaluate_vectors, fused_ranker

    t0 = time.perf_counter()
    e, v = encode_all(model, enc)
    t1 = time.perf_counter()
    rankers = {_label(w): fused_ranker(model, w) for w in grid}
    res = evaluate_vectors(e, v, rankers, enc, n, rows, targets=objectives)
    pts = np.array(
        [[res["metrics"][o][_label(w)][metric] for o in objectives] for w in grid],
        dtype=np.float64,
    )
    return pts, t1 - t0, time.perf_counter() - t1


def tune_run(
    run: str | Path,
    objectives: Sequence[str] = funnel.TARGETS,
    metric: str = "recall",
    n: int | None = None,
    values: Sequence[float] = DEFAULT_VALUES,
    prefer: float = 0.5,
    out: str | Path | None = None,
) -> dict:
    """Score the grid on the run's validation split, find the front, choose a point, write
    ``tune.json`` (+ ``tune.png`` when matplotlib is installed) into ``out`` (default: the run)."""
    from csmf.atomic import write_json
    from csmf.checkpoint import load_checkpoint
    from trainer.config import RunConfig
    from trainer.pipeline import prepare

    if metric not in ("recall", "ndcg"):
        raise TuneError(f"--metric must be recall or ndcg, got {metric!r}")
    if not 0.0 <= prefer <= 1.0:
        raise TuneError(f"--prefer must be in [0, 1], got {prefer}")
    ckpt = load_checkpoint(run)
    cascade = list(ckpt.objectives)
    objectives = list(objectives)
    if len(objectives) != 2 or len(set(objectives)) != 2 or not set(objectives) <= set(cascade):
        raise TuneError(f"--objectives must be two distinct of {cascade}, got {objectives}")
    if not values or any(x < 0 for x in values):
        raise TuneError(f"--values must be non-negative numbers, got {list(values)}")
    cfg = RunConfig.from_dict(ckpt.train_config)
    n = n or cfg.eval.n
    default = tuple(parse_weights(list(cfg.eval.weights), cascade))
    grid = weight_grid(values, len(cascade))
    grid = [tuple(parse_weights(list(w), cascade)) for w in grid]  # same bounds as the service
    if default not in grid:
        grid.append(default)
    enc = prepare(cfg, ckpt.dataset, vocabs=(ckpt.user_vocab, ckpt.item_vocab))
    pts, enc_s, score_s = score_grid(
        ckpt.build_model(), enc, grid, objectives, metric, n, enc.split.val
    )
    front = pareto_front(pts)
    chosen = choose(pts, front, prefer)
    d = grid.index(default)

    def point(i: int) -> dict:
        return {
            "weights": dict(zip(cascade, grid[i], strict=True)),
            objectives[0]: float(pts[i, 0]),
            objectives[1]: float(pts[i, 1]),
        }

    doc = {
        "run": str(Path(run)),
        "dataset": ckpt.dataset,
        "split": "val",
        "val_events": len(enc.split.val),
        "objectives": objectives,
        "cascade": cascade,
        "metric": f"{metric}@{n}",
        "values": sorted(set(float(x) for x in values)),
        "prefer": prefer,
        "grid_size": len(grid),
        "seconds": {"encode": enc_s, "score": score_s},
        "points": [point(i) for i in range(len(grid))],
        "front": [point(int(i)) for i in front],
        "default": point(d) | {"on_front": bool(d in set(front.tolist()))},
        "chosen": point(chosen),
    }
    out = Path(out) if out else Path(run)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / TUNE_NAME, doc)
    doc["plot"] = str(plot(doc, out / PLOT_NAME)) if _has_matplotlib() else None
    return doc


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(doc: dict, path: Path) -> Path:
    """Every triplet (grey), the front (line), the run's default triplet and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = doc["objectives"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter([p[x] for p in doc["points"]], [p[y] for p in doc["points"]], s=10, c="0.75",
               label=f"{doc['grid_size']} triplets")  # fmt: skip
    ax.plot([p[x] for p in doc["front"]], [p[y] for p in doc["front"]], "-o", ms=4, c="C0",
            label="Pareto front")  # fmt: skip
    for key, style, color in (("default", "s", "C1"), ("chosen", "*", "C3")):
        p = doc[key]
        w = _label(p["weights"].values())
        ax.plot(p[x], p[y], style, ms=12, c=color, label=f"{key} {w}")
    ax.set_xlabel(f"{x} {doc['metric']} (validation)")
    ax.set_ylabel(f"{y} {doc['metric']} (validation)")
    ax.set_title(f"csmf tune: {Path(doc['dataset']).name}, weights {'/'.join(doc['cascade'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def apply_scenario(
    doc: dict, name: str, url: str, token: str, expected_version: int, timeout: float = 10.0
) -> dict:
    """PUT the chosen weights as scenario ``name`` through a running service's admin API, only if
    the scenario is still at ``expected_version`` (read before tuning started: an admin write in
    between is a conflict, never silently overwritten). The name is validated and escaped."""
    from csmf.admin_client import put_scenario

    c = doc["chosen"]
    body = {
        "weights": c["weights"],
        "description": f"csmf tune {doc['metric']} {doc['objectives'][0]} "
        f"{c[doc['objectives'][0]]:.4f} / {doc['objectives'][1]} "
        f"{c[doc['objectives'][1]]:.4f} (validation, {doc['run']})",
    }
    return put_scenario(url, token, name, body, expected_version, timeout=timeout)


def summary(doc: dict) -> str:
    x, y = doc["objectives"]
    lines = [f"{doc['grid_size']} triplets on {doc['val_events']:,} validation events, "
             f"{doc['metric']} {x} / {y}; encode {doc['seconds']['encode']:.1f}s, "
             f"score {doc['seconds']['score']:.1f}s",
             f"Pareto front ({len(doc['front'])} points):"]  # fmt: skip
    for p in doc["front"]:
        lines.append(f"  {_label(p['weights'].values()):<20} {p[x]:.4f} / {p[y]:.4f}")
    for key in ("default", "chosen"):
        p = doc[key]
        lines.append(f"{key:<8} {_label(p['weights'].values()):<20} {p[x]:.4f} / {p[y]:.4f}")
    return "\n".join(lines)


def parse_values(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TuneError(f"--values must be comma-separated numbers, got {text!r}") from None
