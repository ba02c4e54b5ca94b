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


def _pruned_model(row_sparse: bool = False, users: int = 6):
    spec = FeatureSpec.from_dict({"user": {"history": {"max_len": 3, "dim": 4}}, "item": {}})
    uv = fit_tower_vocab(spec.user, {"user_id": list(range(users))})
    iv = fit_tower_vocab(spec.item, {"item_id": list(range(9))})
    torch.manual_seed(0)
    model = new_model(ModelConfig(out_dim=8, hidden=(10,), num_objectives=2), spec, uv, iv)
    prune_stage(model, 0, tau=0.6)
    model.use_sparse_gradients(row_sparse)
    return model


def _batches():
    user = {"id": torch.tensor([2, 3, 4, 5]), "history": torch.tensor([[2, 3, 0]] * 4)}
    item = {"id": torch.tensor([2, 5, 7, 9])}
    return user, item


@pytest.mark.parametrize("row_sparse", [False, True], ids=["dense", "row-wise"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_with_masked_gradients_keeps_frozen_entries_bit_identical(weight_decay, row_sparse):
    model = _pruned_model(row_sparse)
    snap = FrozenSnapshot.take(model, 1)
    assert snap.entries  # stage 0 owns something
    params = mark_only_stage_trainable(model, 1, keep_values=True)
    assert any(params.row_sparse) == row_sparse
    opt = params.optimizer(lr=0.1)
    user, item = _batches()
    for _ in range(5):
        e, v = model(user, item, view=1)
        loss = -(e * v).sum() + (e**2).sum()
        opt.zero_grad()
        loss.backward()
        table_grad = model.user.table("id").weight.grad
        assert table_grad.is_sparse == row_sparse
        params.mask_gradients(weight_decay)
        opt.step()
    unfreeze_all(model)
    snap.verify(model)  # no exception
    for p, m, v in zip(params.params, params.masks, params.frozen_values, strict=True):
        assert torch.equal(p.detach()[~m.expand_as(p)], v[~m.expand_as(p)])  # frozen: same bits
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
    params = mark_only_stage_trainable(model, 1, keep_values=True)
    with torch.no_grad():
        for p in params.params:
            p.add_(1.0)
    params.restore_frozen()
    unfreeze_all(model)
    snap.verify(model)


def test_row_wise_step_touches_only_looked_up_rows_and_their_optimizer_state():
    """Training at scale: a step changes the parameters and SparseAdam moments of the rows the
    batch looked up, and nothing of any other row."""
    model = _pruned_model(row_sparse=True, users=50)
    params = mark_only_stage_trainable(model, 1)
    opt = params.optimizer(lr=0.1)
    table = model.user.table("id").weight
    user, item = _batches()  # user rows 2..5
    for _ in range(3):
        e, v = model(user, item, view=1)
        opt.zero_grad()
        (-(e * v).sum()).backward()
        params.mask_gradients(0.1)
        opt.step()
    before = table.detach().clone()
    state_before = {k: t.clone() for k, t in opt.sparse.state[table].items() if k != "step"}
    e, v = model({**user, "id": torch.tensor([7, 8, 8, 9])}, item, view=1)
    opt.zero_grad()
    (-(e * v).sum()).backward()
    params.mask_gradients(0.1)
    opt.step()
    changed = (table.detach() != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [7, 8, 9]
    for k, t in opt.sparse.state[table].items():
        if k == "step":
            continue
        moved = (t != state_before[k]).any(1).nonzero().squeeze(1).tolist()
        assert set(moved) <= {7, 8, 9}, k
        assert not t[2:6].ne(state_before[k][2:6]).any()  # rows of earlier batches untouched


def test_digest_snapshot_of_a_large_table_catches_one_changed_entry(monkeypatch):
    import trainer.ownership as ownership

    monkeypatch.setattr(ownership, "DIGEST_ABOVE", 10)  # digests even for the tiny tables
    monkeypatch.setattr(ownership, "DIGEST_ROWS", 4)
    model = _pruned_model(users=30)
    snap = FrozenSnapshot.take(model, 1)
    assert any(isinstance(v, list) for v in snap.entries.values())
    snap.verify(model)
    table = model.user.table("id")
    col = int(torch.nonzero(table.owner == 0)[0])
    with torch.no_grad():
        table.weight[17, col] = torch.nextafter(table.weight[17, col], torch.tensor(1.0))
    with pytest.raises(OwnershipError, match=r"user\.tables\.id\.weight .*first rows 16-19"):
        snap.verify(model)


def test_resuming_with_an_optimizer_state_of_another_layout_is_a_clear_error():
    dense = mark_only_stage_trainable(_pruned_model(row_sparse=False), 1)
    sparse = mark_only_stage_trainable(_pruned_model(row_sparse=True), 1)
    with pytest.raises(OwnershipError, match="optimizer state of another layout"):
        sparse.optimizer(0.1).load_state_dict(dense.optimizer(0.1).state_dict())


def test_a_row_outside_an_id_table_is_a_clear_error():
    from csmf.errors import FeatureError

    model = _pruned_model(row_sparse=True)
    user, item = _batches()
    rows = model.user.table("id").weight.shape[0]
    with pytest.raises(
        FeatureError, match=f"embedding row {rows + 3} is outside the table of {rows}"
    ):
        model({**user, "id": torch.tensor([2, rows + 3, 4, 5])}, item)
    with pytest.raises(FeatureError, match="embedding row -1 is outside"):
        model({**user, "id": torch.tensor([2, -1, 4, 5])}, item)
