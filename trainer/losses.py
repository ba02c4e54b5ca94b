"""Sampled softmax with log-Q correction and the AML margin (docs/design.md#loss-and-aml).

Row b of a batch is (user u_b, positive item i_b). Its candidates are the batch's positives
(column b is its own positive, the others are in-batch negatives), optionally K extra items drawn
uniformly from the catalogue, and at the exposure stage R unexposed items of the same request:

    logit(b, j) = s_t(u_b, j) / temperature - log E[count of j in the candidate set]  (log-Q)
                  + g(b, j)                                                       (AML, j != b)

In-batch candidates are drawn by popularity, so without the correction the softmax learns
popularity-*debiased* scores (Yi et al., RecSys 2019). With B in-batch draws from q and K uniform
draws, item j is expected ``B·q_j + K/N`` times; its log is subtracted from every candidate
column, the positive's included. Request negatives are not sampled from a known distribution and
get no correction. A candidate equal to the row's positive item is not a negative: it is masked
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
    return torch.where(delta >= 0, sigma - delta, sigma - eta * delta)


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
    margin (B, C) AML gaps; hard_v (B, R, D) / hard_items (B, R) per-row negatives (id < 0 = none).
    Returns (B, C) or (B, C + R).
    """
    b = e.shape[0]
    logits = e @ v.T / temperature  # (B, C)
    if correction is not None:
        logits = logits - correction.unsqueeze(0)
    diag = torch.zeros_like(logits, dtype=torch.bool)
    diag[:, :b] = torch.eye(b, dtype=torch.bool, device=e.device)
    if margin is not None:
        logits = logits + margin.masked_fill(diag, 0.0)
    duplicate = (cols.unsqueeze(0) == pos.unsqueeze(1)) & ~diag  # same item as the positive
    logits = logits.masked_fill(duplicate, NEG_INF)
    if hard_v is not None and hard_items is not None:
        hard = torch.einsum("bd,brd->br", e, hard_v) / temperature  # (B, R)
        bad = (hard_items < 0) | (hard_items == pos.unsqueeze(1))
        logits = torch.cat([logits, hard.masked_fill(bad, NEG_INF)], dim=1)
    return logits


def sampled_softmax_loss(logits: Tensor) -> Tensor:
    """Mean cross-entropy with row b's target at column b."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)
