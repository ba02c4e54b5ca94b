"""Sampled softmax pieces: AML margin on both branches, log-Q, duplicate and request negatives."""

import math

import torch

from trainer.losses import aml_margin, log_q, sampled_softmax_loss, softmax_logits


def test_aml_margin_both_branches_by_hand():
    up_pos = torch.tensor([0.8, 0.2])
    up_cols = torch.tensor([[0.8, 0.5, 0.9], [0.6, 0.2, 0.1]])
    g = aml_margin(up_pos, up_cols, sigma=0.1, eta=1.8)
    # row 0: Δ = 0, 0.3, -0.1 → σ-0 = 0.1, σ-0.3 = -0.2, σ+1.8*0.1 = 0.28
    # row 1: Δ = -0.4, 0, 0.1 → σ+1.8*0.4 = 0.82, 0.1, σ-0.1 = 0.0
    want = torch.tensor([[0.1, -0.2, 0.28], [0.82, 0.1, 0.0]])
    assert torch.allclose(g, want, atol=1e-6)


def test_margin_is_added_to_negatives_only():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([5, 6])
    margin = torch.full((2, 2), 0.5)
    plain = softmax_logits(e, v, items, items, temperature=1.0)
    with_m = softmax_logits(e, v, items, items, temperature=1.0, margin=margin)
    assert torch.equal(with_m.diagonal(), plain.diagonal())
    assert torch.allclose(with_m - plain, torch.tensor([[0.0, 0.5], [0.5, 0.0]]))


def test_log_q_subtracts_log_expected_count():
    prob = torch.tensor([0.5, 0.25, 0.25, 0.0])
    cols = torch.tensor([0, 1, 2])
    corr = log_q(prob, cols, n_batch=4, n_extra=0, n_items=4)
    assert torch.allclose(corr, torch.log(torch.tensor([2.0, 1.0, 1.0])))
    e = torch.randn(3, 5)
    v = torch.randn(3, 5)
    plain = softmax_logits(e, v, cols, cols, temperature=0.5)
    corrected = softmax_logits(e, v, cols, cols, temperature=0.5, correction=corr)
    assert torch.allclose(plain - corrected, corr.expand(3, 3))
    # popular items lose relatively most: the popular positive's loss goes up
    assert corrected[0, 0] - corrected[0, 1] < plain[0, 0] - plain[0, 1]
    # mixing uniform extras: expected count B*q + K/N
    mixed = log_q(prob, torch.tensor([3]), n_batch=4, n_extra=2, n_items=4)
    assert math.isclose(float(mixed), math.log(0.5), rel_tol=1e-6)


def test_duplicate_positives_are_not_negatives():
    e = torch.randn(4, 3)
    v = torch.randn(4, 3)
    items = torch.tensor([7, 8, 7, 9])  # rows 0 and 2 share a positive item
    logits = softmax_logits(e, v, items, items, temperature=1.0)
    assert logits[0, 2] == float("-inf") and logits[2, 0] == float("-inf")
    finite = torch.isfinite(logits)
    assert finite.sum() == 16 - 2 and torch.all(finite.diagonal())
    loss = sampled_softmax_loss(logits)
    assert torch.isfinite(loss)


def test_request_negatives_are_masked_when_missing_or_positive():
    e = torch.eye(2)
    v = torch.eye(2)
    pos = torch.tensor([1, 2])
    hard_items = torch.tensor([[3, -1], [2, 4]])  # -1 = no candidate; 2 = row 1's positive
    hard_v = torch.ones(2, 2, 2)
    logits = softmax_logits(e, v, pos, pos, 1.0, hard_v=hard_v, hard_items=hard_items)
    assert logits.shape == (2, 4)
    assert torch.isfinite(logits[0, 2]) and logits[0, 3] == float("-inf")
    assert logits[1, 2] == float("-inf") and torch.isfinite(logits[1, 3])
