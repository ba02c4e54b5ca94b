"""The cascade on a tiny real dataset: state machine, exactness of the serving trick on trained
owners, and no forgetting across stages."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csmf.checkpoint import new_model
from csmf.weights import dim_scale
from trainer.cascade import (
    CascadeStateError,
    Phase,
    StageMachine,
    drop_history,
    probe_scores,
    run_cascade,
)
from trainer.config import ConfigError, load_config
from trainer.evaluate import encode_all
from trainer.ownership import owned_parameters
from trainer.pipeline import prepare


def test_state_machine_runs_the_paper_order_and_refuses_others():
    sm = StageMachine(3)
    with pytest.raises(CascadeStateError, match="cannot go to 'prune'"):
        sm.advance(Phase.PRUNE)
    for _ in range(2):
        for p in (Phase.TRAIN, Phase.PRUNE, Phase.RECOVER, Phase.FREEZE):
            sm.advance(p)
    sm.advance(Phase.TRAIN)
    with pytest.raises(CascadeStateError, match="allowed: freeze"):
        sm.advance(Phase.PRUNE)  # the last stage never prunes
    sm.advance(Phase.FREEZE)
    sm.advance(Phase.DONE)
    assert sm.stage == 2
    with pytest.raises(CascadeStateError):
        sm.advance(Phase.TRAIN)


def test_state_machine_without_ar_skips_recover():
    sm = StageMachine(2, recover=False)
    sm.advance(Phase.TRAIN)
    sm.advance(Phase.PRUNE)
    with pytest.raises(CascadeStateError):
        sm.advance(Phase.RECOVER)
    sm.advance(Phase.FREEZE)


def test_cascade_leaves_every_objective_an_output_slice(trained):
    slices = trained.metrics["output_slices"]
    assert len(slices) == 3 and all(s >= 2 for s in slices) and sum(slices) == 16
    stages = trained.metrics["stages"]
    assert [s["objective"] for s in stages] == ["exposure", "click", "conversion"]
    assert "slices" in stages[0] and "slices" not in stages[2]
    assert all(np.isfinite(s["loss"]).all() for s in stages)


def _users_items(trained, seed):
    rng = np.random.default_rng(seed)
    enc = trained.enc
    users = rng.integers(0, enc.n_users, 8)
    items = rng.integers(0, enc.n_items, 11)
    return enc.user_batch(users), enc.item_batch(items)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.lists(st.floats(0, 5, allow_nan=False), min_size=3, max_size=3).filter(any),
)
def test_scaled_full_output_equals_weighted_sum_of_view_scores(trained, seed, k):
    model = trained.model
    ub, ib = _users_items(trained, seed)
    with torch.no_grad():
        e, v = model(ub, ib)
        fused = sum(k[t] * (model.user(ub, t) @ model.item(ib, t).T) for t in range(3))
        c = torch.as_tensor(dim_scale(k, model.output_owner.numpy()))
        scaled = (e * c) @ v.T  # (U, I)
    rel = float((scaled - fused).abs().max() / fused.abs().max().clamp(min=1e-12))
    assert rel <= 1e-5


def test_owners_are_non_trivial_after_a_real_cascade(trained):
    for g in trained.model.unit_groups():
        assert int(g.owner.max()) >= 1, g.name  # every layer gave units to a later stage


def test_no_forgetting_after_the_whole_cascade(trained):
    params = {name: p.detach() for name, _, _, p in owned_parameters(trained.model)}
    for t, snap in enumerate(trained.frozen[:-1]):
        for name, (mask, values) in snap.items():
            assert torch.equal(params[name][mask], values), f"{name} moved after stage {t}"
    now = probe_scores(trained.model, trained.enc, trained.probe)
    for t, before in enumerate(trained.probe_scores):
        assert torch.equal(now[:, t], before), f"s_{t} changed after stage {t} froze"


def test_two_objective_cascade(tiny_cfg, tiny_data):
    from csmf.checkpoint import new_model
    from trainer.config import RunConfig

    d = tiny_cfg.to_dict()
    d["cascade"]["objectives"] = ["click", "conversion"]
    d["eval"]["weights"] = [1.0, 1.0]
    d["train"]["epochs"] = [1]
    cfg = RunConfig.from_dict(d)
    enc = prepare(cfg, tiny_data)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    metrics = run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
    assert len(metrics["output_slices"]) == 2 and min(metrics["output_slices"]) >= 2


def test_single_stage_is_an_exposure_only_model(tiny_cfg, tiny_data):
    from csmf.checkpoint import new_model
    from trainer.config import RunConfig

    d = tiny_cfg.to_dict()
    d["cascade"]["objectives"] = ["exposure"]
    d["eval"]["weights"] = [1.0]
    d["train"]["epochs"] = [1]
    cfg = RunConfig.from_dict(d)
    enc = prepare(cfg, tiny_data)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    metrics = run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
    assert metrics["output_slices"] == [16]


def test_history_dropout_blanks_a_share_of_slots_and_only_in_training(tiny_cfg, tiny_data):
    enc = prepare(tiny_cfg, tiny_data)
    inputs = enc.user_batch(np.arange(enc.n_users))
    h = inputs["history"].clone()
    assert drop_history(inputs, 0.0, np.random.default_rng(0)) is inputs
    dropped = drop_history(inputs, 0.5, np.random.default_rng(0))["history"]
    assert torch.equal(dropped[dropped > 0], h[dropped > 0])  # survivors are untouched
    assert 0.4 < float((dropped[h > 0] > 0).float().mean()) < 0.6
    assert torch.equal(inputs["history"], h)  # the caller's batch is not modified
    with pytest.raises(ConfigError, match="history_dropout must be in"):
        load_config(None, ["train.history_dropout=1.0"])
    per_stage = load_config(
        None,
        ['train.history=["before", "others", "others"]', "train.history_dropout=[0, 0.5, 0.5]"],
    ).train
    assert [per_stage.stage_history(t) for t in range(3)] == [
        ("before", 0.0),
        ("others", 0.5),
        ("others", 0.5),
    ]
    with pytest.raises(ConfigError, match="train.history needs 1 or 3 values"):
        load_config(None, ['train.history=["before", "others"]'])


def test_history_dropout_changes_training_not_encoding(tiny_cfg, tiny_data):
    def train(p: float) -> torch.Tensor:
        cfg = dataclasses.replace(
            tiny_cfg, train=dataclasses.replace(tiny_cfg.train, history_dropout=p)
        )
        torch.manual_seed(0)
        enc = prepare(cfg, tiny_data)
        model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
        run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
        e, _ = encode_all(model, enc)
        e2, _ = encode_all(model, enc)
        assert torch.equal(e, e2)  # encoding is deterministic: no dropout outside training
        return e

    assert not torch.allclose(train(0.0), train(0.5))
