"""Carried optimizer moments (trainer/moments.py): a stage restarted from its captured moments
steps exactly as the optimizer that kept running would have — what lets a warm start continue a
run's optimisation instead of taking a fresh Adam's lr-sized first steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from csmf.checkpoint import new_model
from csmf.towers import OwnedEmbedding
from trainer.cascade import run_epochs
from trainer.encoding import stage_examples
from trainer.moments import capture, restore
from trainer.ownership import mark_only_stage_trainable, owned_parameters


def _model(cfg, enc):
    torch.manual_seed(0)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    model.use_sparse_gradients(True)
    return model


def _epoch(model, enc, cfg, opt, params, seed: int) -> None:
    ex = stage_examples(enc, cfg.objectives[0])
    run_epochs(
        model, enc, ex, 0, cfg.objectives[0], params, cfg, 1, np.random.default_rng(seed),
        "test", False, optimizer=opt,
    )  # fmt: skip


@pytest.mark.parametrize("carry", [True, False])
def test_restored_moments_step_exactly_as_the_running_optimizer(tiny_cfg, tiny_enc, carry):
    model = _model(tiny_cfg, tiny_enc)
    params = mark_only_stage_trainable(model, 0)
    opt = params.optimizer(0.01)
    _epoch(model, tiny_enc, tiny_cfg, opt, params, seed=1)
    saved = capture(model, 0, opt)
    restarted = copy.deepcopy(model)

    _epoch(model, tiny_enc, tiny_cfg, opt, params, seed=2)  # the optimizer kept running

    params2 = mark_only_stage_trainable(restarted, 0)
    opt2 = params2.optimizer(0.01)
    if carry:
        names = restore(restarted, 0, opt2, saved)
        assert set(names) == set(saved)
    _epoch(restarted, tiny_enc, tiny_cfg, opt2, params2, seed=2)

    same = [
        torch.equal(p, q)
        for (_, _, _, p), (_, _, _, q) in zip(
            owned_parameters(model), owned_parameters(restarted), strict=True
        )
    ]
    # carried: bit-identical to continued training; fresh: the lr-sized first steps differ
    assert all(same) if carry else not all(same)


def _trained_one_epoch(cfg, enc):
    """A model after one stage-0 epoch, and the moments its optimizer then holds."""
    model = _model(cfg, enc)
    params = mark_only_stage_trainable(model, 0)
    opt = params.optimizer(0.01)
    _epoch(model, enc, cfg, opt, params, seed=1)
    return model, capture(model, 0, opt)


def test_tables_keep_only_the_stages_own_columns(tiny_cfg, tiny_enc):
    model, saved = _trained_one_epoch(tiny_cfg, tiny_enc)
    tables = 0
    for name, module, _, p in owned_parameters(model):
        rec = saved[name]
        assert rec["step"] > 0
        if isinstance(module, OwnedEmbedding):
            tables += 1
            cols = torch.nonzero(module.owner == 0).squeeze(1)
            assert torch.equal(rec["cols"], cols)
            assert rec["exp_avg_sq"].shape == (p.shape[0], len(cols))
            assert rec["exp_avg_sq"].sum() > 0
        else:
            assert rec["cols"] is None and rec["exp_avg"].shape == p.shape
    assert tables >= 2


def test_moments_of_other_columns_or_shapes_are_not_restored(tiny_cfg, tiny_enc):
    model, saved = _trained_one_epoch(tiny_cfg, tiny_enc)
    name = next(n for n, m, _, _ in owned_parameters(model) if isinstance(m, OwnedEmbedding))
    saved[name] = {**saved[name], "cols": saved[name]["cols"][:-1]}  # another stage's layout
    layer = next(n for n, m, _, _ in owned_parameters(model) if not isinstance(m, OwnedEmbedding))
    saved[layer] = {**saved[layer], "exp_avg": saved[layer]["exp_avg"][:1]}  # another shape
    fresh = mark_only_stage_trainable(model, 0).optimizer(0.01)
    names = restore(model, 0, fresh, saved)
    assert name not in names and layer not in names
    assert len(names) == len(saved) - 2
