"""The serving trick is exact by construction
(docs/design.md#owned-units-and-why-one-search-is-exact): view(t) equals the full network masked
to dims owned <= t, and (c ⊙ e) · v equals sum_t k_t s_t for any weights."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csmf.checkpoint import new_model
from csmf.features import FeatureSpec, encode_rows, fit_tower_vocab
from csmf.towers import ModelConfig
from csmf.weights import dim_scale

SPEC = FeatureSpec.from_dict(
    {
        "user": {
            "fields": [
                {"name": "g", "kind": "categorical", "dim": 4},
                {"name": "age", "kind": "numeric"},
            ],
            "history": {"max_len": 5, "dim": 6},
        },
        "item": {"fields": [{"name": "tags", "kind": "multi_hot", "dim": 5, "max_len": 3}]},
    }
)
USERS = {"user_id": list(range(12)), "g": ["a", "b", "c"] * 4, "age": [float(i) for i in range(12)]}
ITEMS = {"item_id": list(range(25)), "tags": [["x", "y", "z"][: i % 4] for i in range(25)]}


def _model_and_batches(seed: int, out_dim: int = 12, objectives: int = 3):
    torch.manual_seed(seed)
    uv, iv = fit_tower_vocab(SPEC.user, USERS), fit_tower_vocab(SPEC.item, ITEMS)
    model = new_model(
        ModelConfig(out_dim=out_dim, hidden=(16, 8), num_objectives=objectives), SPEC, uv, iv
    )
    gen = torch.Generator().manual_seed(seed)
    for g in model.unit_groups():  # random but valid ownership of every unit
        g.owner.copy_(torch.randint(0, objectives, g.owner.shape, generator=gen, dtype=torch.uint8))
    model.sync_owners()
    model.check_owners()
    rng = np.random.default_rng(seed)
    hist = [list(rng.integers(2, 27, size=rng.integers(0, 6))) for _ in range(12)]
    ub = {k: torch.as_tensor(v) for k, v in encode_rows(SPEC.user, uv, USERS, hist).items()}
    ib = {k: torch.as_tensor(v) for k, v in encode_rows(SPEC.item, iv, ITEMS).items()}
    return model.eval(), ub, ib


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), objectives=st.integers(1, 4))
def test_view_equals_masked_full_output(seed, objectives):
    model, ub, ib = _model_and_batches(seed, objectives=objectives)
    with torch.no_grad():
        e, v = model(ub, ib)
        for t in range(objectives):
            et, vt = model(ub, ib, view=t)
            live = (model.output_owner <= t).float()
            # a separately computed restricted network gives exactly the masked full output
            assert torch.equal(et, e * live)
            assert torch.equal(vt, v * live)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.lists(st.floats(0, 5, allow_nan=False), min_size=3, max_size=3).filter(any),
)
def test_scaled_query_equals_weighted_view_scores(seed, k):
    model, ub, ib = _model_and_batches(seed)
    with torch.no_grad():
        e, v = model(ub, ib)
        fused = sum(k[t] * (model.user(ub, t) @ model.item(ib, t).T) for t in range(3))
        c = torch.as_tensor(dim_scale(k, model.output_owner.numpy()))
        scaled = (e * c) @ v.T
    denom = fused.abs().max().clamp(min=1e-12)
    assert float((scaled - fused).abs().max() / denom) <= 1e-5


def test_final_layer_owners_shared_by_both_towers():
    model, _, _ = _model_and_batches(0)
    assert torch.equal(model.user.layers[-1].owner, model.output_owner)
    assert torch.equal(model.item.layers[-1].owner, model.output_owner)
    model.output_owner[0] = (model.output_owner[0] + 1) % 3
    model.user.layers[-1].owner.copy_(model.output_owner)  # only one tower updated: refused
    try:
        model.check_owners()
    except Exception as exc:
        assert "differ between towers" in str(exc)
    else:
        raise AssertionError("check_owners accepted towers with different output owners")


def test_disallowed_connections_get_no_gradient():
    model, ub, ib = _model_and_batches(3)
    e, v = model(ub, ib)
    (e @ v.T).sum().backward()
    for tower in (model.user, model.item):
        for layer in tower.layers:
            blocked = ~layer.connection_mask()
            assert torch.all(layer.weight.grad[blocked] == 0)
