"""Freezing is real: masked gradients + a fresh Adam leave frozen entries bit-identical, and the
snapshot check fails loudly when something moves."""

import pytest
import torch

from csmf.checkpoint import new_model
from csmf.errors import OwnershipError
from csmf.features import FeatureSpec, fit_tower_vocab
from csmf.towers import ModelConfig
from trainer.ownership import FrozenSnapshot, mark_only_stage_trainable, unfreeze_all
from trainer.pruning import prune_stage


def _pruned_model():
    spec = FeatureSpec.from_dict({"user": {"history": {"max_len": 3, "dim": 4}}, "item": {}})
    uv = fit_tower_vocab(spec.user, {"user_id": list(range(6))})
    iv = fit_tower_vocab(spec.item, {"item_id": list(range(9))})
    torch.manual_seed(0)
    model = new_model(ModelConfig(out_dim=8, hidden=(10,), num_objectives=2), spec, uv, iv)
    prune_stage(model, 0, tau=0.6)
    return model


def _batches():
    user = {"id": torch.tensor([2, 3, 4, 5]), "history": torch.tensor([[2, 3, 0]] * 4)}
    item = {"id": torch.tensor([2, 5, 7, 9])}
    return user, item


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_with_masked_gradients_keeps_frozen_entries_bit_identical(weight_decay):
    model = _pruned_model()
    snap = FrozenSnapshot.take(model, 1)
    assert snap.entries  # stage 0 owns something
    params = mark_only_stage_trainable(model, 1)
    opt = params.optimizer(lr=0.1)
    user, item = _batches()
    for _ in range(5):
        e, v = model(user, item, view=1)
        loss = -(e * v).sum() + (e**2).sum()
        opt.zero_grad()
        loss.backward()
        params.mask_gradients(weight_decay)
        opt.step()
    unfreeze_all(model)
    snap.verify(model)  # no exception
    moved = [
        p for p, v in zip(params.params, params.frozen_values, strict=True) if not torch.equal(p, v)
    ]
    assert moved  # the stage's own units did train


def test_unmasked_adam_moves_frozen_entries_and_verify_fails():
    model = _pruned_model()
    snap = FrozenSnapshot.take(model, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)  # the Avalanche mistake: no masks
    user, item = _batches()
    e, v = model(user, item, view=1)
    (-(e * v).sum()).backward()
    opt.step()
    with pytest.raises(OwnershipError, match="changed parameters owned by earlier stages"):
        snap.verify(model)


def test_trainable_masks_select_only_the_stage_units():
    model = _pruned_model()
    params = mark_only_stage_trainable(model, 1)
    out = model.user.layers[-1]
    idx = next(i for i, p in enumerate(params.params) if p is out.weight)
    mask = params.masks[idx]
    assert torch.equal(mask.any(1), out.owner == 1)
    assert not mask[out.owner == 0].any()


def test_restore_frozen_undoes_tampering():
    model = _pruned_model()
    snap = FrozenSnapshot.take(model, 1)
    params = mark_only_stage_trainable(model, 1)
    with torch.no_grad():
        for p in params.params:
            p.add_(1.0)
    params.restore_frozen()
    unfreeze_all(model)
    snap.verify(model)
