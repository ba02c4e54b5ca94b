"""Adding an objective to a trained cascade (trainer/extend.py): the last stage's unowned units
are exactly zero in every vector until a new objective claims them; claiming them trains only
them; every earlier objective's parameters, scores and served results stay bit-identical; bad
input is refused before any training."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.services import AUTH

from csmf.checkpoint import load_checkpoint
from csmf.errors import ConfigError, DataError
from trainer.config import config_from_dict, load_config
from trainer.data.dataset import load_dataset, split_by_time
from trainer.encoding import encode_dataset
from trainer.evaluate import encode_all
from trainer.extend import extend_run
from trainer.ownership import entry_owner, owned_parameters
from trainer.pipeline import train_run

QUICK = ["train.epochs=[2,2,2]", "train.ar_epochs=1", "train.threads=1"]


@pytest.fixture(scope="module")
def carted_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny dataset plus a fourth label: 'carted', a part of the clicks (items of topic t0
    and every third other click)."""
    out = tmp_path_factory.mktemp("carted") / "data"
    shutil.copytree(tiny_data, out)
    ev = pq.read_table(out / "events.parquet")
    items = pq.read_table(out / "items.parquet")
    t0 = pc.is_in(ev["item_id"], value_set=items.filter(pc.equal(items["topic"], "t0"))["item_id"])
    third = pa.array(np.arange(ev.num_rows) % 3 == 0)
    carted = pc.and_(ev["clicked"], pc.or_(t0, third))
    pq.write_table(ev.append_column("carted", carted), out / "events.parquet")
    return out


@pytest.fixture(scope="module")
def base_run(carted_data, tiny_config_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config(tiny_config_path, [*QUICK, "cascade.last_tau=0.3"])
    torch.manual_seed(0)
    train_run(cfg, carted_data, out, log=lambda _: None, progress=False)
    return out


@pytest.fixture(scope="module")
def extended(base_run, carted_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("extended") / "run"
    _, metrics = extend_run(
        base_run, "cart", "carted", carted_data, out, overrides=["train.epochs=[2,2,2,4]"],
        log=lambda _: None, progress=False,
    )  # fmt: skip
    return out, metrics


def _encoded(run: Path):
    ckpt = load_checkpoint(run)
    cfg = config_from_dict(ckpt.train_config)
    ds = load_dataset(ckpt.dataset, cfg.features, objectives=())
    enc = encode_dataset(
        ds, cfg.features, split_by_time(ds.events), (ckpt.user_vocab, ckpt.item_vocab)
    )
    return ckpt, enc


def test_the_last_stage_leaves_unowned_dims_that_are_zero_in_every_vector(base_run):
    ckpt, enc = _encoded(base_run)
    model = ckpt.build_model()
    unowned = model.output_owner == 3
    assert 0 < int(unowned.sum()) < len(unowned)
    e, v = encode_all(model, enc)
    assert torch.count_nonzero(e[:, unowned]) == 0 and torch.count_nonzero(v[:, unowned]) == 0
    assert torch.count_nonzero(e[:, ~unowned]) > 0
    stages = ckpt.metrics["stages"]
    assert "slices" in stages[-1]  # the last stage pruned (CPP) before it froze


def test_extend_trains_only_the_unowned_units_and_keeps_earlier_ones_bit_identical(
    base_run, extended
):
    out, metrics = extended
    old, new = load_checkpoint(base_run), load_checkpoint(out)
    assert new.objectives == (*old.objectives, "cart")
    old_model, new_model = old.build_model(), new.build_model()
    assert torch.equal(old_model.output_owner, new_model.output_owner)  # the unowned are now 3
    old_params = {n: p for n, _, _, p in owned_parameters(old_model)}
    moved_new = 0
    for name, module, attr, p in owned_parameters(new_model):
        earlier = entry_owner(module, attr) < 3
        assert torch.equal(p.detach()[earlier], old_params[name].detach()[earlier]), name
        moved_new += int((p.detach()[~earlier] != old_params[name].detach()[~earlier]).sum())
    assert moved_new > 0
    rec = metrics["stages"][-1]
    assert rec["objective"] == "cart" and rec["loss"][0] > rec["loss"][-1]


def test_earlier_objectives_score_bit_identically_on_every_user(base_run, extended):
    out, _ = extended
    old_ckpt, enc = _encoded(base_run)
    new_ckpt = load_checkpoint(out)
    old_model, new_model = old_ckpt.build_model(), new_ckpt.build_model()
    users = np.arange(enc.n_users)
    items = np.arange(enc.n_items)
    with torch.no_grad():
        for model_a, model_b in ((old_model, new_model),):
            e_a, v_a = model_a.user(enc.user_batch(users)), model_a.item(enc.item_batch(items))
            e_b, v_b = model_b.user(enc.user_batch(users)), model_b.item(enc.item_batch(items))
            for t in range(3):
                sa = (e_a * model_a.objective_masks()[t]) @ v_a.T
                sb = (e_b * model_b.objective_masks()[t]) @ v_b.T
                assert torch.equal(sa, sb), f"s_{t} changed"


def test_served_scores_of_old_weightings_are_bit_identical(
    base_run, extended, tmp_path, make_client
):
    """Bundles of the run before and after: the same requests with the old scenario weights
    (the new objective's weight 0) return the same items with bit-identical scores."""
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    out, _ = extended
    before, _ = build_bundle(
        base_run, tmp_path / "before", BuildConfig(index="flat"), progress=False
    )
    after, manifest = build_bundle(
        out, tmp_path / "after", BuildConfig(index="flat"), progress=False
    )
    assert manifest.objectives == ("exposure", "click", "conversion", "cart")
    a, b = make_client(before), make_client(after)
    users = load_checkpoint(base_run).user_vocab.ids.values
    for weights in ([1.0, 1.8, 1.2], [0.0, 1.0, 0.0], [0.3, 2.0, 0.7]):
        for u in users:
            ra = a.post("/v1/retrieve", json={"user_id": u, "k": 20, "weights": weights})
            rb = b.post("/v1/retrieve", json={"user_id": u, "k": 20, "weights": [*weights, 0.0]})
            assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
            assert ra.json()["items"] == rb.json()["items"], (u, weights)
    for u in users:  # the default scenario: the paper's weights, 0 for the added objective
        ra = a.post("/v1/retrieve", json={"user_id": u, "k": 20})
        rb = b.post("/v1/retrieve", json={"user_id": u, "k": 20})
        assert ra.json()["items"] == rb.json()["items"], u
        assert rb.json()["weights"] == {**ra.json()["weights"], "cart": 0.0}
    # the admin API and scenarios take the four objectives, by name or as a list of four
    put = b.put("/admin/scenarios/carts", json={"weights": [1, 1.8, 1.2, 2]}, headers=AUTH)
    assert put.status_code == 200, put.text
    assert b.get("/admin/scenarios/carts", headers=AUTH).json()["weights"]["cart"] == 2.0
    three = b.put("/admin/scenarios/short", json={"weights": [1, 1.8, 1.2]}, headers=AUTH)
    assert three.status_code == 422 and "4 weights" in three.text
    hit = b.post("/v1/retrieve", json={"user_id": users[0], "k": 5, "scenario": "carts"})
    assert hit.status_code == 200 and hit.json()["weights"]["cart"] == 2.0
    named = b.post("/v1/retrieve", json={"user_id": users[0], "k": 5, "weights": {"cart": 1.0}})
    assert named.status_code == 200 and len(named.json()["items"]) == 5


def test_bad_input_is_refused_before_training(
    base_run, extended, carted_data, tiny_data, tiny_config_path, tmp_path
):
    out, _ = extended
    with pytest.raises(ConfigError, match="already in the cascade"):
        extend_run(out, "cart", "carted", carted_data, tmp_path / "a", log=lambda _: None)
    with pytest.raises(ConfigError, match="lowercase"):
        extend_run(base_run, "Cart!", "carted", carted_data, tmp_path / "b", log=lambda _: None)
    with pytest.raises(DataError, match="dwelled"):
        extend_run(base_run, "dwell", "dwelled", carted_data, tmp_path / "c", log=lambda _: None)
    never = tmp_path / "never"
    shutil.copytree(carted_data, never)
    ev = pq.read_table(never / "events.parquet")
    zeros = pa.array(np.zeros(ev.num_rows, bool))
    pq.write_table(
        ev.set_column(ev.schema.get_field_index("carted"), "carted", zeros),
        never / "events.parquet",
    )
    with pytest.raises(DataError, match="never true"):
        extend_run(base_run, "cart", "carted", never, tmp_path / "d", log=lambda _: None)
    paper = tmp_path / "paper-run"  # the paper's cascade: the last stage keeps every unit
    train_run(
        load_config(tiny_config_path, QUICK), tiny_data, paper, log=lambda _: None, progress=False
    )
    with pytest.raises(ConfigError, match="last_tau"):
        extend_run(paper, "cart", "carted", carted_data, tmp_path / "e", log=lambda _: None)
    for name in "abcde":
        assert not (tmp_path / name / "checkpoint.pt").exists()


@pytest.mark.slow
def test_cli_extend_and_eval(base_run, carted_data, tmp_path):
    csmf = [sys.executable, "-m", "csmf.cli"]
    out = tmp_path / "run"
    done = subprocess.run(
        [*csmf, "extend", str(base_run), "--objective", "cart", "--label", "carted",
         "--data", str(carted_data), "--out", str(out), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "cart" in done.stdout and "bit-identical" in done.stdout
    ev = subprocess.run([*csmf, "eval", "--run", str(out)], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert "cart" in ev.stdout
