"""CPP (paper §4.2) on hand-made layers, guard rails, the fixed variant, and what pruning does to
owners and connections."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csmf.checkpoint import new_model
from csmf.features import FeatureSpec, fit_tower_vocab
from csmf.towers import ModelConfig
from trainer.pruning import cpp_free_count, prune_stage, select_freed


def test_cpp_matches_the_cumulative_formula_by_hand():
    # importances 1,2,3,4,10 (sum 20) sorted; cumsum 1,3,6,10,20; tau*c_n = 0.75*20 = 15
    # → c_j <= 15 for j = 1..4: the four smallest are freed, the 10 stays
    imp = torch.tensor([4.0, 10.0, 1.0, 3.0, 2.0])
    assert cpp_free_count(imp, 0.75) == 4
    assert select_freed(imp, 0.75).tolist() == [True, False, True, True, True]
    # tau = 0.3 → 6 > 6.0? cumsum 1,3,6 <= 6 → three freed
    assert select_freed(imp, 0.3).tolist() == [False, False, True, True, True]
    # one dominant unit: 0.75 of the mass lies below it, so all others go
    imp = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert cpp_free_count(imp, 0.75) == 3


def test_fixed_variant_frees_a_fraction_by_importance():
    imp = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0])
    freed = select_freed(imp, 0.25, method="fixed")  # round(0.25 * 8) = 2 least important
    assert freed.tolist() == [False, True, False, True, False, False, False, False]


def test_guard_rails():
    imp = torch.tensor([1.0, 1.0, 1.0, 1.0])  # cpp at 0.75 frees 3
    assert int(select_freed(imp, 0.75, min_keep=2).sum()) == 2  # at least 2 kept
    imp = torch.tensor([100.0, 1.0, 1.0])
    assert int(select_freed(imp, 0.001, min_free=2).sum()) == 2  # at least 2 freed
    assert int(select_freed(torch.tensor([1.0]), 0.9, min_keep=1, min_free=1).sum()) == 0


@settings(max_examples=60, deadline=None)
@given(
    imp=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=40),
    tau=st.floats(0.05, 0.95),
    min_keep=st.integers(1, 5),
    min_free=st.integers(0, 5),
)
def test_cpp_on_random_layers(imp, tau, min_keep, min_free):
    imp = torch.tensor(imp, dtype=torch.float64)
    freed = select_freed(imp, tau, "cpp", min_keep, min_free)
    n, k = len(imp), int(freed.sum())
    assert n - k >= min(min_keep, n)  # min_keep always wins
    assert k >= min(min_free, n - min_keep) or k == n - min_keep
    if k and (~freed).any():  # freed units are never more important than kept ones
        assert imp[freed].max() <= imp[~freed].min()
    plain = cpp_free_count(imp, tau)
    assert k == max(0, min(max(plain, min_free), n - min_keep))


def _model():
    spec = FeatureSpec.from_dict(
        {"user": {"fields": [{"name": "g", "kind": "categorical", "dim": 4}]}, "item": {}}
    )
    uv = fit_tower_vocab(spec.user, {"user_id": list(range(5)), "g": list("abcab")})
    iv = fit_tower_vocab(spec.item, {"item_id": list(range(7))})
    torch.manual_seed(0)
    return new_model(ModelConfig(out_dim=8, hidden=(6,), num_objectives=3), spec, uv, iv)


def test_prune_stage_moves_owners_and_cuts_freed_to_kept_connections():
    model = _model()
    before = {g.name: g.importance().clone() for g in model.unit_groups()}
    sizes = prune_stage(model, 0, tau=0.75, min_keep=2, min_free=1)
    for g in model.unit_groups():
        freed = g.owner == 1
        assert sizes[g.name] == {"kept": int((~freed).sum()), "freed": int(freed.sum())}
        expect = select_freed(before[g.name], 0.75, "cpp", 2, 1)
        assert torch.equal(freed, expect), g.name
    for tower in (model.user, model.item):  # final layer shares output owners
        assert torch.equal(tower.layers[-1].owner, model.output_owner)
        for layer in tower.layers:  # a kept unit has no stored weight from a freed input
            cut = (layer.owner == 0).unsqueeze(1) & (layer.in_owner == 1).unsqueeze(0)
            assert cut.any() and torch.all(layer.weight[cut] == 0)


def test_reinit_changes_only_freed_units():
    model = _model()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    prune_stage(model, 0, tau=0.75, freed_init="reinit", generator=torch.Generator().manual_seed(3))
    emb = model.user.table("cat:g")
    kept = emb.owner == 0
    assert torch.equal(emb.weight[:, kept], old["user.tables.cat__g.weight"][:, kept])
    assert not torch.equal(emb.weight[:, ~kept], old["user.tables.cat__g.weight"][:, ~kept])
    assert torch.all(emb.weight[0] == 0)  # padding row stays zero


def test_random_variant_frees_cpps_count_but_not_by_importance():
    imp = torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4, 1.0, 0.5, 6.0, 7.0])
    want = cpp_free_count(imp, 0.5)
    picks = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        freed = select_freed(imp, 0.5, "random", min_keep=1, min_free=0, generator=g)
        assert int(freed.sum()) == want  # same budget as CPP
        picks.add(tuple(freed.tolist()))
    cpp = select_freed(imp, 0.5, "cpp", min_keep=1, min_free=0)
    assert len(picks) > 1  # drawn, not ranked
    assert any(p != tuple(cpp.tolist()) for p in picks)
