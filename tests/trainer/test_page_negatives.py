"""loss.page_negatives: the exposure stage's negatives include the items shown but not clicked in
the example's own page view — exactly those, never the positive, with no log-Q correction — the
cascade still freezes bit for bit, and data without page views is refused clearly."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from csmf.checkpoint import new_model
from csmf.errors import ConfigError, DataError
from trainer.baselines import with_changes
from trainer.cascade import batch_loss, exposure_negatives, run_cascade
from trainer.config import RunConfig
from trainer.encoding import stage_examples
from trainer.losses import log_q
from trainer.ownership import entry_owner, owned_parameters
from trainer.pipeline import prepare


def _page_items(enc, request: int, train: set[int]) -> list[int]:
    """Items of the train events of page view ``request`` that were not clicked, by hand."""
    ev = enc.events
    rows = np.flatnonzero(ev.request == request)
    return [int(ev.item[r]) for r in rows if r in train and not ev.clicked[r]]


def test_page_views_hold_exactly_the_unclicked_items_shown_beside_the_positive(tiny_cfg, tiny_data):
    enc = prepare(tiny_cfg, tiny_data)
    ex = stage_examples(enc, "exposure")
    train = set(enc.split.train.tolist())
    rng = np.random.default_rng(0)
    all_of_them = enc.page_views().sample(ex.request, ex.item, 10, rng)  # pages hold <= 5
    some = enc.page_views().sample(ex.request, ex.item, 2, rng)
    checked = 0
    for b in range(len(ex)):
        want = [i for i in _page_items(enc, ex.request[b], train) if i != ex.item[b]]
        got = all_of_them[b][all_of_them[b] >= 0]
        assert sorted(got.tolist()) == sorted(want)  # every one of them, nothing else
        assert ex.item[b] not in got and ex.item[b] not in some[b]  # never the positive itself
        drawn = some[b][some[b] >= 0]
        assert len(drawn) == min(2, len(want)) and len(set(drawn.tolist())) == len(drawn)
        assert set(drawn.tolist()) <= set(want)
        checked += len(want) > 0
    assert checked > len(ex) // 2  # most examples had page negatives: the check saw them


def test_page_views_of_another_split_are_rebuilt(tiny_cfg, tiny_data):
    import dataclasses

    enc = prepare(tiny_cfg, tiny_data)
    first = enc.page_views()
    half = dataclasses.replace(
        enc, split=dataclasses.replace(enc.split, train=enc.split.train[::2])
    )
    assert half.page_views() is not first
    assert len(half.page_views().items) < len(first.items)
    assert enc.page_views() is first  # cached while the split stays


def test_page_negatives_enter_the_exposure_loss_without_log_q(tiny_cfg, tiny_data):
    cfg = with_changes(tiny_cfg, {"loss": {"page_negatives": 3, "request_negatives": 2}})
    torch.manual_seed(0)
    enc = prepare(cfg, tiny_data)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    ex = stage_examples(enc, "exposure")
    idx = np.arange(48)
    loss = batch_loss(model, enc, ex, idx, 0, "exposure", cfg, np.random.default_rng(7))

    rng = np.random.default_rng(7)  # the same draws, in batch_loss's order
    lc = cfg.loss
    pos = ex.item[idx]
    e = model.user(enc.user_batch(ex.user[idx], ex.hist_end[idx]), 0)  # (B, D)
    cols = np.concatenate([pos, rng.integers(0, enc.n_items, lc.extra_negatives)])
    hard = exposure_negatives(enc, ex, idx, "exposure", cfg, rng)  # (B, R + P)
    assert hard.shape == (len(idx), 2 + 3)
    page = hard[:, 2:]
    assert (page >= 0).sum() > len(idx)  # the page negatives are really there
    v = model.item(enc.item_batch(cols), 0)
    corr = log_q(ex.item_prob, torch.as_tensor(cols), len(pos), lc.extra_negatives, enc.n_items)
    batch = e @ v.T / lc.temperature - corr  # in-batch columns: log-Q corrected
    dup = torch.as_tensor(cols)[None, :] == torch.as_tensor(pos)[:, None]
    dup[:, : len(idx)].fill_diagonal_(False)  # a duplicate of the positive, not the positive
    batch = batch.masked_fill(dup, float("-inf"))
    hv = model.item(enc.item_batch(np.maximum(hard, 0).reshape(-1)), 0).view(len(idx), 5, -1)
    extra = torch.einsum("bd,brd->br", e, hv) / lc.temperature  # no correction
    extra[torch.as_tensor((hard < 0) | (hard == pos[:, None]))] = float("-inf")
    manual = F.cross_entropy(torch.cat([batch, extra], 1), torch.arange(len(idx)))
    assert torch.allclose(loss, manual, atol=1e-5)

    # the option changes the loss, and only at the exposure stage
    off = with_changes(cfg, {"loss": {"page_negatives": 0}})
    without = batch_loss(model, enc, ex, idx, 0, "exposure", off, np.random.default_rng(7))
    assert not torch.allclose(loss, without)
    clicks = stage_examples(enc, "click")
    assert exposure_negatives(enc, clicks, np.arange(8), "click", cfg, rng) is None


def test_page_negatives_cascade_keeps_frozen_entries_bit_identical(tiny_cfg, tiny_data):
    cfg = with_changes(tiny_cfg, {"loss": {"page_negatives": 3}, "train": {"epochs": [2, 1, 1]}})
    torch.manual_seed(0)
    enc = prepare(cfg, tiny_data)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    frozen = []

    def record(t, m) -> None:
        snap = {}
        for name, module, attr, p in owned_parameters(m):
            mask = entry_owner(module, attr) <= t
            snap[name] = (mask.clone(), p.detach()[mask].clone())
        frozen.append(snap)

    run_cascade(model, enc, cfg, log=lambda _: None, progress=False, on_freeze=record)
    params = {name: p.detach() for name, _, _, p in owned_parameters(model)}
    for t, snap in enumerate(frozen[:-1]):
        for name, (mask, values) in snap.items():
            assert mask.any() or t > 0
            assert torch.equal(params[name][mask], values), f"{name} moved after stage {t}"


@pytest.fixture(scope="module")
def no_page_views(tiny_data, tmp_path_factory):
    """The tiny dataset without request_id (and so without candidates): like MovieLens-100K."""
    root = tmp_path_factory.mktemp("nopages") / "data"
    shutil.copytree(tiny_data, root)
    (root / "candidates.parquet").unlink()
    events = pq.read_table(root / "events.parquet")
    pq.write_table(events.drop_columns(["request_id"]), root / "events.parquet")
    return root


def test_page_negatives_on_data_without_page_views_is_a_clear_error(tiny_cfg, no_page_views):
    cfg = with_changes(tiny_cfg, {"loss": {"page_negatives": 2}})
    enc = prepare(cfg, no_page_views)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="request_id.*loss.page_negatives = 0"):
        run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step ran
    # the same data trains without the option
    off = with_changes(cfg, {"loss": {"page_negatives": 0}, "train": {"epochs": [1]}})
    run_cascade(model, enc, off, log=lambda _: None, progress=False)


def test_page_negatives_refuse_streaming_and_the_catalogue_softmax(tiny_cfg, tiny_data):
    d = tiny_cfg.to_dict()
    d["loss"]["page_negatives"] = 2
    with pytest.raises(ConfigError, match="in memory"):
        RunConfig.from_dict({**d, "train": {**d["train"], "data": "stream"}})
    with pytest.raises(ConfigError, match="needs loss.negatives = 'in-batch'"):
        RunConfig.from_dict({**d, "loss": {**d["loss"], "negatives": "catalogue"}})
    with pytest.raises(ConfigError, match="page_negatives must be >= 0"):
        RunConfig.from_dict({**d, "loss": {**d["loss"], "page_negatives": -1}})
    cfg = RunConfig.from_dict(d)  # 'auto' that resolves to streaming: refused at the start
    enc = prepare(cfg, tiny_data, stream=True)
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab)
    with pytest.raises(ConfigError, match="streamed path"):
        run_cascade(model, enc, cfg, log=lambda _: None, progress=False)
