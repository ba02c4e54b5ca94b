"""Sampled softmax pieces: AML margin on both branches, log-Q, duplicate and request negatives;
the exact catalogue softmax; the 'others' training history."""

import math

import numpy as np
import torch

from csmf.checkpoint import new_model
from trainer.cascade import batch_loss, catalogue_loss, upstream_scores
from trainer.encoding import stage_examples
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


def _catalogue_setup(tiny_cfg, tiny_data, **loss):
    from trainer.baselines import with_changes
    from trainer.pipeline import prepare

    cfg = with_changes(tiny_cfg, {"loss": {"negatives": "catalogue", **loss}})
    torch.manual_seed(0)
    enc = prepare(cfg, tiny_data)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    return cfg, enc, model


def test_catalogue_softmax_is_exact_cross_entropy_over_every_item(tiny_cfg, tiny_data):
    cfg, enc, model = _catalogue_setup(tiny_cfg, tiny_data, aml=False)
    ex = stage_examples(enc, "click")
    idx = np.arange(min(16, len(ex)))
    rng = np.random.default_rng(0)
    loss = batch_loss(model, enc, ex, idx, 0, "click", cfg, rng)
    e = model.user(enc.user_batch(ex.user[idx], ex.hist_end[idx]), 0)
    v = model.item(enc.item_batch(np.arange(enc.n_items)), 0)
    logits = e @ v.T / cfg.loss.temperature  # (B, N): no sampling, so no log-Q
    manual = -(logits.log_softmax(1)[torch.arange(len(idx)), torch.as_tensor(ex.item[idx])]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_catalogue_aml_gap_goes_to_negatives_only(tiny_cfg, tiny_data):
    cfg, enc, model = _catalogue_setup(tiny_cfg, tiny_data, sigma=0.7, eta=2.0)
    ex = stage_examples(enc, "click")
    idx = np.arange(min(8, len(ex)))
    e = model.user(enc.user_batch(ex.user[idx], ex.hist_end[idx]), 1)
    pos = ex.item[idx]
    with_aml = catalogue_loss(model, enc, e, pos, 1, cfg)
    v = model.item(enc.item_batch(np.arange(enc.n_items)), 1)
    up = upstream_scores(e.detach(), v.detach(), model, 1, cfg)  # (B, N)
    pos_t = torch.as_tensor(pos)
    gap = aml_margin(up[torch.arange(len(idx)), pos_t], up, 0.7, 2.0)
    gap[torch.arange(len(idx)), pos_t] = 0.0
    logits = e @ v.T / cfg.loss.temperature + gap
    manual = torch.nn.functional.cross_entropy(logits, pos_t)
    assert torch.allclose(with_aml, manual, atol=1e-6)
    no_aml = catalogue_loss(model, enc, e, pos, 0, cfg)  # stage 0: no upstream, no gap
    assert not torch.allclose(with_aml, no_aml)


def test_others_history_is_the_whole_train_history_without_the_target(tiny_cfg, tiny_data):
    from trainer.baselines import with_changes
    from trainer.pipeline import prepare

    cfg = with_changes(tiny_cfg, {"train": {"history": "others"}})
    enc = prepare(cfg, tiny_data)
    ex = stage_examples(enc, "exposure")
    idx = np.arange(min(32, len(ex)))
    user, pos = ex.user[idx], ex.item[idx]
    batch = enc.user_batch(user, drop=pos)["history"].numpy()  # (B, L)
    full = enc.user_batch(user)["history"].numpy()
    for b in range(len(idx)):
        assert pos[b] + 2 not in batch[b]  # the target is never visible
        kept = full[b][(full[b] > 0) & (full[b] != pos[b] + 2)]
        assert sorted(batch[b][batch[b] > 0]) == sorted(kept)  # everything else is
    assert (full == pos[:, None] + 2).any()  # the target was in the window, so this tested it
