"""MOPPR — multi-objective personalised product retrieval.

Paper: Zheng, Bian, Meng, Zhang, Wang, Zhang, Li, Zhuang, Liu, Zeng, "Multi-Objective
Personalized Product Retrieval in Taobao Search" (arXiv 2210.04170, 2022). One embedding-based
retrieval model (one vector per item) is trained on *entire-space multi-positive* samples: the
events of a page view are aggregated into one sample whose items carry hierarchical grades
(relevance < exposure < click < purchase), and a modified softmax optimises every level at once —
each positive of a level competes with the items below that level, not with the other
positives.

Here, one sample = one page view (the data's request; ML-100K has none, so a page view is a user's
ratings of one day — there are no unexposed items there, only the in-batch/catalogue level).
Grades: unexposed candidate of the page view 0 < exposure 1 < click 2 < conversion 3; items of
other page views of the batch (or, with ``loss.negatives = "catalogue"``, every item of the
catalogue the page view does not contain) are the relevance level −1. For level g ∈ {1, 2, 3}
and each item i of the page view with grade ≥ g:

    ℓ_g(i) = −log( exp(s_i) / (exp(s_i) + Σ_{j: grade(j) < g} exp(s_j)) ),  s = <e_u, v>/τ

averaged over the level's positives; levels weighted by ``eval.weights`` (exposure, click,
conversion — the same weights every other method's fused ranking uses; the paper's level
weights are not public). In-batch columns get CSMF's log-Q correction (−log of the expected
number of draws under the exposure frequency) when ``loss.log_q``; unexposed candidates, which
are not drawn from a known distribution, get none (as CSMF's request negatives). The user's
history is the one before the page view (its earliest event). Budget: the most epochs of any
cascade stage, over page views, the exposure stage's lr; batches of ``train.batch_size``
exposures (whole page views). Not in ours: the query/relevance tower of search (there is no
query), and the paper's further tricks (e.g. its temperature per level).

Served: one ``out_dim`` vector per item, one search; the weights are fixed at training time
(a query-time weight change cannot be served exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trainer.baselines.two_tower import TwoTowerStudent
from trainer.config import RunConfig
from trainer.encoding import Encoded

DAY = 86_400


@dataclass
class PageViews:
    """Train page views as CSR: ``ptr`` into (item, grade); user, history end per page view."""

    user: np.ndarray  # (P,)
    hist_end: np.ndarray  # (P,)
    ptr: np.ndarray  # (P + 1,)
    item: np.ndarray  # (M,)
    grade: np.ndarray  # (M,) 0 unexposed, 1 exposed, 2 clicked, 3 converted

    def __len__(self) -> int:
        return len(self.user)


def page_views(enc: Encoded) -> PageViews:
    """Group the train split's events by request (or, without requests, by user and day); add
    each request's unexposed candidates (grade 0) unless the page view exposed them."""
    ev = enc.events
    rows = enc.split.train
    has_request = bool((ev.request[rows] >= 0).all())
    if has_request:
        key = ev.request[rows]
    else:
        key = ev.user[rows].astype(np.int64) * (ev.ts.max() // DAY + 2) + ev.ts[rows] // DAY
    order = np.lexsort((ev.ts[rows], key))
    rows, key = rows[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    grade = 1 + ev.clicked[rows].astype(np.int64) + ev.converted[rows].astype(np.int64)
    user = ev.user[rows[starts]]
    first_ts = ev.ts[rows[starts]]
    hist_end = (
        enc.history.before(user, first_ts) if enc.history is not None else np.zeros_like(user)
    )
    items, grades, ptr = [], [], [0]
    cand = enc.candidates if has_request else None
    for s, e in zip(starts, ends, strict=True):
        it, gr = ev.item[rows[s:e]], grade[s:e]
        if cand is not None:
            r = key[s]
            extra = cand.items[cand.ptr[r] : cand.ptr[r + 1]]
            extra = np.setdiff1d(extra, it)
            it, gr = np.r_[it, extra], np.r_[gr, np.zeros(len(extra), np.int64)]
        # one entry per item: its highest grade in the page view
        uniq, inv = np.unique(it, return_inverse=True)
        best = np.zeros(len(uniq), np.int64)
        np.maximum.at(best, inv, gr)
        items.append(uniq)
        grades.append(best)
        ptr.append(ptr[-1] + len(uniq))
    return PageViews(user, hist_end, np.asarray(ptr), np.concatenate(items), np.concatenate(grades))


def graded_softmax_loss(logits: Tensor, grade: Tensor, level_weights: list[float]) -> Tensor:
    """MOPPR's multi-positive softmax. logits (P, C); grade (P, C): −1 relevance level (other
    page views / catalogue), 0.. the page view's own grades, < −1 = not a candidate (masked).
    For each level g = 1..len(level_weights): every column of grade ≥ g against the columns of
    grade in [−1, g)."""
    total = logits.new_zeros(())
    for g, w in enumerate(level_weights, start=1):
        pos = grade >= g
        if not bool(pos.any()):
            continue
        neg = (grade >= -1) & (grade < g)
        neg_lse = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
        per = torch.logaddexp(logits, neg_lse) - logits  # −log softmax of each positive
        total = total + w * per[pos].mean()
    return total


def batch_grades(pv: PageViews, idx: np.ndarray, n_items: int, catalogue: bool):
    """Columns (item rows) and the (P, C) grade matrix of page views ``idx``; also which columns
    were exposed in the batch (for log-Q) and how many exposures the batch holds."""
    parts = [np.arange(pv.ptr[p], pv.ptr[p + 1]) for p in idx]
    own_items = [pv.item[s] for s in parts]
    own_grades = [pv.grade[s] for s in parts]
    cols = np.arange(n_items) if catalogue else np.unique(np.concatenate(own_items))
    grade = np.full((len(idx), len(cols)), -1, np.int64)
    for r, (it, gr) in enumerate(zip(own_items, own_grades, strict=True)):
        grade[r, np.searchsorted(cols, it)] = gr
    all_items, all_grades = np.concatenate(own_items), np.concatenate(own_grades)
    exposed_items = all_items[all_grades >= 1]
    exposed = np.isin(cols, exposed_items)
    return cols, grade, exposed, len(exposed_items)


def train_moppr(cfg: RunConfig, enc: Encoded) -> tuple[TwoTowerStudent, dict]:
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    pv = page_views(enc)
    model = TwoTowerStudent(cfg, enc)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.stage_lr(0))
    lc = cfg.loss
    catalogue = lc.negatives == "catalogue"
    sizes = np.diff(pv.ptr)
    per_batch = max(1, int(cfg.train.batch_size / max(sizes.mean(), 1.0)))
    counts = np.bincount(pv.item[pv.grade >= 1], minlength=enc.n_items).astype(np.float64)
    q = torch.as_tensor(counts / counts.sum(), dtype=torch.float32)
    levels = [float(w) for w in cfg.eval.weights][:3]
    epochs = max(cfg.train.stage_epochs(t) for t in range(len(cfg.objectives)))
    losses = []
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(len(pv))
        total, steps = 0.0, 0
        for lo in range(0, len(perm), per_batch):
            idx = perm[lo : lo + per_batch]
            cols, grade, exposed, n_exposed = batch_grades(pv, idx, enc.n_items, catalogue)
            e = model.user(enc.user_batch(pv.user[idx], pv.hist_end[idx]))
            v = model.item(enc.item_batch(cols))
            logits = e @ v.T / lc.temperature
            if lc.log_q and not catalogue:
                c = torch.as_tensor(cols)
                correction = torch.log((n_exposed * q[c]).clamp(min=1e-12))
                logits = logits - correction * torch.as_tensor(exposed, dtype=logits.dtype)
            loss = graded_softmax_loss(logits, torch.as_tensor(grade), levels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
    model.eval()
    return model, {
        "loss": losses,
        "page_views": len(pv),
        "mean_items_per_page_view": float(sizes.mean()),
    }
