"""Scoring half of bench/cold_items.py (torch, imported after the trainings): the held-out items'
Recall / nDCG @ N for the cold run (vectors from features at the unknown id row, through the
numpy item tower the bundle ships), the warm run and popularity; results file."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from csmf.checkpoint import load_checkpoint
from csmf.results import finish_run, pm, run_line, script_command, table, write_results
from index_builder.encode import user_encoder_from_model
from trainer.config import load_config
from trainer.encoding import Encoded, user_items
from trainer.evaluate import encode_all, fused_ranker, rank_metrics
from trainer.pipeline import prepare

TARGETS = ("click", "conversion")
METHODS = (
    "cold (features, unknown id row)",
    "warm (trained with the items)",
    "popularity (oracle counts)",
    "random order (reference)",
)
SCOPES = ("among held-out", "full catalogue")


def _rows(enc: Encoded, ids: list[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(enc.item_vocab.ids.values)}
    return np.array([index[i] for i in ids], np.int64)


def _subset(sets: dict[int, np.ndarray], keep: np.ndarray) -> dict[int, np.ndarray]:
    """Item rows of ``sets`` restricted to ``keep`` (rows), renumbered to positions in keep."""
    pos = np.full(int(keep.max()) + 1, -1, np.int64)
    pos[keep] = np.arange(len(keep))
    out = {}
    for u, items in sets.items():
        items = items[items <= keep.max()]
        p = pos[items]
        p = p[p >= 0]
        if len(p):
            out[u] = p
    return out


def _random_scores(n_items: int, seed: int):
    """Per-user random scores (seeded by user): what chance alone gives."""

    def scores(users: np.ndarray) -> np.ndarray:
        return np.stack([np.random.default_rng([seed, int(u)]).random(n_items) for u in users])

    return scores


def cold_vectors(ckpt, items_table, held: list[str]) -> np.ndarray:
    """(H, D) vectors of the held-out items from their features, with the bundle's numpy item
    tower (unpermuted here: the rankers are in the model's own output order)."""
    model = ckpt.build_model()
    feats = ckpt.features
    perm = np.arange(int(model.output_owner.numel()))
    enc = user_encoder_from_model(
        model.item, feats.item, ckpt.item_vocab, ckpt.item_vocab.ids, perm
    )
    rows = {str(r["item_id"]): r for r in items_table.to_pylist()}
    vocab = set(ckpt.item_vocab.ids.values)
    assert not vocab & set(held), "held-out items leaked into the cold run's vocabulary"
    return enc.encode([rows[i] for i in held])


def score_seed(cfg, full: Encoded, items_table, job: dict, n: int) -> dict:
    held = job["held"]
    held_rows = _rows(full, held)
    test = full.split.test
    is_held = np.zeros(full.n_items, bool)
    is_held[held_rows] = True
    test_held = test[is_held[full.events.item[test]]]
    truth = {t: user_items(full, test_held, full.events.positive(t)) for t in TARGETS}
    seen = user_items(full, full.split.train)

    warm_ckpt = load_checkpoint(job["runs"]["warm"][1])
    warm = warm_ckpt.build_model()
    e_w, v_w = encode_all(warm, full)
    cold_ckpt = load_checkpoint(job["runs"]["cold"][1])
    cold = cold_ckpt.build_model()
    enc_c = prepare(cfg, job["runs"]["cold"][0])
    e_c_own, v_c_own = encode_all(cold, enc_c)
    assert enc_c.user_vocab.ids.values == full.user_vocab.ids.values
    v_c = torch.zeros_like(v_w)
    warm_ids = [i for i in full.item_vocab.ids.values if i not in set(held)]
    v_c[torch.as_tensor(_rows(full, warm_ids))] = v_c_own[torch.as_tensor(_rows(enc_c, warm_ids))]
    v_c[torch.as_tensor(held_rows)] = torch.as_tensor(cold_vectors(cold_ckpt, items_table, held))
    counts = np.bincount(full.events.item[full.split.train], minlength=full.n_items)
    pop = torch.as_tensor(counts.astype(np.float32))

    w = cfg.eval.weights
    out: dict[str, dict] = {}
    for scope in SCOPES:
        sub = held_rows if scope == "among held-out" else np.arange(full.n_items)
        tr = {t: _subset(s, sub) for t, s in truth.items()} if scope == "among held-out" else truth
        ex = _subset(seen, sub) if scope == "among held-out" else seen
        idx = torch.as_tensor(sub)
        runs = {
            METHODS[0]: (e_c_own, v_c[idx], {"m": fused_ranker(cold, w)}),
            METHODS[1]: (e_w, v_w[idx], {"m": fused_ranker(warm, w)}),
            METHODS[2]: (e_w, v_w[idx], {"m": ("fixed", pop[idx])}),
            METHODS[3]: (e_w, v_w[idx], {"m": ("rows", _random_scores(len(sub), job["seed"]))}),
        }
        for method, (e, v, ranker) in runs.items():
            for t in TARGETS:
                m = rank_metrics(e, v, ranker, tr[t], ex, n)["m"]
                out[f"{scope}|{method}|{t}"] = m
    out["_users"] = {t: len(truth[t]) for t in TARGETS}
    return out


def evaluate_and_write(args, jobs: list[dict], info: dict) -> None:
    """Score every seed's warm and cold runs and write the results; ``info``: the run's
    :func:`csmf.results.run_info`, taken before the trainings."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    config = jobs[0]["config"]
    cfg = load_config(config, args.sets)
    full = prepare(cfg, args.data)
    items_table = pq.read_table(Path(args.data) / "items.parquet")
    per_seed = {}
    for job in jobs:
        per_seed[job["seed"]] = score_seed(cfg, full, items_table, job, args.n)
        print(f"seed {job['seed']} scored", flush=True)
    keys = [k for k in per_seed[jobs[0]["seed"]] if not k.startswith("_")]
    summary = {}
    for k in keys:
        for metric in ("recall", "ndcg"):
            vals = np.array([per_seed[s][k][metric] for s in per_seed])
            summary[f"{k}|{metric}"] = [float(vals.mean()), float(vals.std())]
    n = args.n
    body = [
        f"ML-100K, {round(args.holdout * 100)} % of the items held out of training (seeded random "
        f"choice per seed), seeds {list(per_seed)}; fused ranker with the config's eval weights "
        f"{list(cfg.eval.weights)}; targets: the held-out items' test-split clicks / "
        f"conversions. mean ± std over seeds.",
        "",
    ]
    for scope in SCOPES:
        body += [f"## {scope}", ""]
        rows = []
        for method in METHODS:
            cells = [method]
            for t in TARGETS:
                for metric in ("recall", "ndcg"):
                    cells.append(pm(summary[f"{scope}|{method}|{t}|{metric}"]))
            rows.append(cells)
        header = ["method"] + [f"{t} {m}@{n}" for t in TARGETS for m in ("Recall", "nDCG")]
        body += table(header, rows, "lrrrr") + [""]
    users = per_seed[jobs[0]["seed"]]["_users"]
    info = finish_run(info)
    body += [
        "`among held-out`: each user's ranking over the held-out items only (which new item?); "
        "`full catalogue`: over every item, held-out ones with their cold vectors (how new items "
        "compete with trained ones). Train-period items are excluded, as in `csmf eval`. "
        "Popularity counts the whole dataset's train period, held-out items included: counts a "
        "new item would not have, so it is an oracle bound, not a deployable baseline.",
        "",
        f"Evaluated users (seed {jobs[0]['seed']}): {users['click']} with held-out test clicks, "
        f"{users['conversion']} with held-out test conversions. The cold run's user vectors use "
        "its own train histories (without the held-out items).",
        "",
        f"{run_line(info)} Trainings with `--set train.threads=1` under nice; scoring "
        f"{time.perf_counter() - t0:.0f} s.",
    ]
    doc = {
        "seeds": list(per_seed),
        "holdout": args.holdout,
        "n": n,
        "sets": args.sets,
        "summary": summary,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "run": info,
    }
    stem = Path("bench/results") / f"cold-items-{Path(args.data).resolve().name}"
    command = script_command(Path(__file__).with_name("cold_items.py"))
    md, _ = write_results(
        stem, "Cold items: new items served from their features", command, body, doc
    )
    print(f"wrote {md}")
