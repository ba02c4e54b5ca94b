"""Sampled softmax with log-Q correction and the AML margin (docs/design.md#loss-and-aml).

Row b of a batch is (user u_b, positive item i_b). Its candidates are the batch's positives
(column b is its own positive, the others are in-batch negatives), optionally K extra items drawn
uniformly from the catalogue, and at the exposure stage R unexposed items of the same request and
P items shown but not clicked in the same page view (``loss.page_negatives``):

    logit(b, j) = s_t(u_b, j) / temperature - log E[count of j in the candidate set]  (log-Q)
                  + g(b, j)                                                       (AML, j != b)

In-batch candidates are drawn by popularity, so without the correction the softmax learns
popularity-*debiased* scores (Yi et al., RecSys 2019). With B in-batch draws from q and K uniform
draws, item j is expected ``B·q_j + K/N`` times; its log is subtracted from every candidate
column, the positive's included. Request and page-view negatives are not sampled from a known
distribution and get no correction. A candidate equal to the row's positive item is not a negative: it is masked
out (no false negatives from duplicates in a batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def log_q(item_prob: Tensor, cols: Tensor, n_batch: int, n_extra: int, n_items: int) -> Tensor:
    """log of the expected number of times each candidate column's item is drawn, (C,)."""
    expected = n_batch * item_prob[cols] + n_extra / n_items
    return torch.log(expected.clamp(min=1e-12))


def aml_margin(up_pos: Tensor, up_cols: Tensor, sigma: float, eta: float) -> Tensor:
    """Required gap g added to each negative's logit, (B, C).

    Δ = up(u, i) - up(u, j): Δ >= 0 (upstream agrees the positive is better) → g = σ - Δ;
    Δ < 0 (upstream prefers the negative) → g = σ - η·Δ, i.e. the positive must win by η|Δ| more.
    """
    delta = up_pos.unsqueeze(1) - up_cols  # (B, C)
    # sigma - delta - (eta - 1)·min(delta, 0), in place: a few passes over (B, C), no copies
    return delta.clamp(max=0).mul_(eta - 1.0).add_(delta).neg_().add_(sigma)


def softmax_logits(
    e: Tensor,
    v: Tensor,
    pos: Tensor,
    cols: Tensor,
    temperature: float,
    correction: Tensor | None = None,
    margin: Tensor | None = None,
    hard_v: Tensor | None = None,
    hard_items: Tensor | None = None,
) -> Tensor:
    """Candidate logits of every row; column b of row b is the positive.

    e (B, D) user vectors; v (C, D) candidate item vectors, the first B being the positives;
    pos (B,) positive item ids; cols (C,) candidate item ids; correction (C,) log-Q;
    margin (B, C) AML gaps (its positives are zeroed in place); hard_v (B, R, D) / hard_items (B, R) per-row negatives (id < 0 = none).
    Returns (B, C) or (B, C + R).
    """
    b = e.shape[0]
    # every (B, C) pass counts at B = C = 4,096: the temperature scales e (B, D), log-Q enters
    # as the matmul's bias, and the margin and the mask are applied in place
    scaled = e / temperature
    if correction is not None:
        logits = torch.addmm(correction.neg().unsqueeze(0), scaled, v.T)  # (B, C)
    else:
        logits = scaled @ v.T  # (B, C)
    if margin is not None:
        margin = margin.detach().clone() if margin.requires_grad else margin
        margin[:, :b].diagonal().zero_()  # the positive gets no gap
        logits = logits.add_(margin)
    duplicate = cols.unsqueeze(0) == pos.unsqueeze(1)  # same item as the positive
    duplicate[:, :b].diagonal().zero_()  # ... but not the positive itself
    logits = logits.masked_fill_(duplicate, NEG_INF)
    if hard_v is not None and hard_items is not None:
        hard = torch.einsum("bd,brd->br", e, hard_v) / temperature  # (B, R)
        bad = (hard_items < 0) | (hard_items == pos.unsqueeze(1))
        logits = torch.cat([logits, hard.masked_fill(bad, NEG_INF)], dim=1)
    return logits


def sampled_softmax_loss(logits: Tensor) -> Tensor:
    """Mean cross-entropy with row b's target at column b."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)
