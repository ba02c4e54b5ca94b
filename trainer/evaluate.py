"""Offline evaluation (paper §5.1.4): full-catalogue top-N retrieval per user.

For each evaluated user, rank every item in the catalogue except the user's train items, take the
top N, and score Recall@N and nDCG@N against the user's held-out positives (test clicks, test
conversions). Every ranker is a per-dimension query scale over one pair of full outputs (E, V):

- view t (objective t's own score s_t): scale = 1 on dims owned <= t, 0 elsewhere;
- fused score under weights k: scale c_j = sum_{t >= owner(j)} k_t (exact;
  docs/design.md#owned-units-and-why-one-search-is-exact);
- popularity: the same item order for everyone (count over train exposures / clicks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

import csmf.objectives as funnel
from csmf.towers import TwoTower
from csmf.weights import dim_scale
from trainer.encoding import Encoded, user_items

# ("scale", (D,)), ("fixed", (N,) item scores) or ("rows", f) with f(users (b,)) → (b, N) scores
Ranker = tuple[str, Any]


@torch.no_grad()
def encode_all(
    model: TwoTower, enc: Encoded, batch: int = 4096, users: np.ndarray | None = None
) -> tuple[Tensor, Tensor]:
    """Full outputs of every user (history = all train events; or of ``users``, in that order)
    and every item: (U, D), (N, D)."""
    was_training = model.training
    model.eval()
    users = np.arange(enc.n_users) if users is None else users
    e = torch.cat(
        [model.user(enc.user_batch(users[i : i + batch])) for i in range(0, len(users), batch)]
    )
    items = np.arange(enc.n_items)
    v = torch.cat(
        [model.item(enc.item_batch(items[i : i + batch])) for i in range(0, len(items), batch)]
    )
    model.train(was_training)
    return e.cpu(), v.cpu()  # ranking runs on the CPU whatever device trained


def view_ranker(model: TwoTower, t: int) -> Ranker:
    return ("scale", model.objective_masks()[t].cpu())


def fused_ranker(model: TwoTower, weights: Sequence[float]) -> Ranker:
    return ("scale", torch.as_tensor(dim_scale(weights, model.output_owner.cpu().numpy())))


def popularity_ranker(enc: Encoded, mask: np.ndarray | None = None) -> Ranker:
    """Train-split counts of items (all exposures, or events where ``mask``)."""
    rows = enc.split.train if mask is None else enc.split.train[mask[enc.split.train]]
    counts = np.bincount(enc.events.item[rows], minlength=enc.n_items).astype(np.float32)
    return ("fixed", torch.as_tensor(counts))


def rank_metrics(
    e: Tensor,
    v: Tensor,
    rankers: Mapping[str, Ranker],
    truth: Mapping[int, np.ndarray],
    exclude: Mapping[int, np.ndarray],
    n: int,
    chunk: int | None = None,
) -> dict[str, dict[str, float]]:
    """Mean Recall@n and nDCG@n over the users in ``truth`` for each ranker."""
    users = np.array(sorted(truth), dtype=np.int64)
    n_items = v.shape[0]
    chunk = chunk or max(1, min(512, 20_000_000 // n_items))  # (chunk, N) scores stay ~80 MB
    n = min(n, n_items)
    discount = 1.0 / torch.log2(torch.arange(n, dtype=torch.float64) + 2.0)  # (n,)
    sums = {name: [0.0, 0.0] for name in rankers}
    for lo in range(0, len(users), chunk):
        part = users[lo : lo + chunk]
        b = len(part)
        hit_mask = _membership(part, truth, b, n_items)  # (b, N) bool
        excl_mask = _membership(part, exclude, b, n_items)
        n_true = hit_mask.sum(1).double()  # (b,)
        ideal = torch.cumsum(discount, 0)[(n_true.clamp(max=n) - 1).long()]  # (b,)
        eu = e[torch.as_tensor(part)]
        for name, (kind, arg) in rankers.items():
            if kind == "scale":
                scores = (eu * arg) @ v.T
            elif kind == "fixed":
                scores = arg.expand(b, n_items).clone()
            else:  # per-user scores from a function (e.g. a synthetic dataset's oracle)
                scores = torch.as_tensor(arg(part), dtype=torch.float32)
            scores = scores.masked_fill(excl_mask, float("-inf"))
            top = torch.topk(scores, n, dim=1).indices  # (b, n)
            hits = torch.gather(hit_mask, 1, top).double()  # (b, n)
            sums[name][0] += float((hits.sum(1) / n_true).sum())
            sums[name][1] += float(((hits * discount).sum(1) / ideal).sum())
    m = max(len(users), 1)
    return {name: {"recall": s[0] / m, "ndcg": s[1] / m} for name, s in sums.items()}


def _membership(users: np.ndarray, sets: Mapping[int, np.ndarray], b: int, n_items: int) -> Tensor:
    mask = torch.zeros(b, n_items, dtype=torch.bool)
    rows, cols = [], []
    for r, u in enumerate(users):
        items = sets.get(int(u))
        if items is not None and len(items):
            rows.append(np.full(len(items), r))
            cols.append(items)
    if rows:
        mask[torch.as_tensor(np.concatenate(rows)), torch.as_tensor(np.concatenate(cols))] = True
    return mask


def evaluate_model(
    model: TwoTower,
    enc: Encoded,
    objectives: Sequence[str],
    weights: Sequence[float],
    n: int = 50,
    rows: np.ndarray | None = None,
    targets: Sequence[str] = funnel.TARGETS,
) -> dict:
    """Test-split table: every view, the fused score and popularity rankings, on each target.

    ``rows`` defaults to the test split. Train items of each user are excluded from the ranking.
    """
    e, v = encode_all(model, enc)
    rankers: dict[str, Ranker] = {o: view_ranker(model, t) for t, o in enumerate(objectives)}
    rankers["fused"] = fused_ranker(model, weights)
    rankers["popularity (exposures)"] = popularity_ranker(enc)
    rankers["popularity (clicks)"] = popularity_ranker(enc, enc.events.clicked)
    out = evaluate_vectors(e, v, rankers, enc, n, rows, targets)
    return {"n": n, "weights": list(weights), **out}


def evaluate_vectors(
    e: Tensor,
    v: Tensor,
    rankers: Mapping[str, Ranker],
    enc: Encoded,
    n: int = 50,
    rows: np.ndarray | None = None,
    targets: Sequence[str] = funnel.TARGETS,
) -> dict:
    """The protocol of :func:`evaluate_model` for any user/item vectors (baselines share it):
    {"users": {target: count}, "metrics": {target: {ranker: {"recall", "ndcg"}}}}."""
    rows = enc.split.test if rows is None else rows
    exclude = user_items(enc, enc.split.train)
    out: dict = {"users": {}, "metrics": {}}
    for target in targets:
        truth = user_items(enc, rows, enc.events.positive(target))
        out["users"][target] = len(truth)
        out["metrics"][target] = rank_metrics(e, v, rankers, truth, exclude, n)
    return out


def validation_recall(
    model: TwoTower, enc: Encoded, stage: int, objective: str, n: int = 50, max_users: int = 0
) -> float:
    """Recall@n of view ``stage`` on the validation positives of ``objective`` (monitoring)."""
    truth = user_items(enc, enc.split.val, enc.events.positive(objective))
    if not truth:
        return float("nan")
    if max_users and len(truth) > max_users:
        keep = sorted(truth)[:max_users]
        truth = {u: truth[u] for u in keep}
    exclude = user_items(enc, enc.split.train)
    if len(truth) * 4 < enc.n_users:  # a sample (e.g. streamed data): encode only its users
        users = np.array(sorted(truth), dtype=np.int64)
        e, v = encode_all(model, enc, users=users)
        truth = {i: truth[int(u)] for i, u in enumerate(users)}
        exclude = {i: exclude[int(u)] for i, u in enumerate(users) if int(u) in exclude}
    else:
        e, v = encode_all(model, enc)
    return rank_metrics(e, v, {"view": view_ranker(model, stage)}, truth, exclude, n)["view"][
        "recall"
    ]
