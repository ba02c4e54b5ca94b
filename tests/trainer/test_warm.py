"""Warm start (trainer/warm.py): a run trained on yesterday's data continues on today's — tables
grow for new users and items with every existing row kept, each stage moves only its own units,
only the events after what the run trained through are trained on, and bad input is refused
before any training with the previous run left intact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from csmf.checkpoint import load_checkpoint
from csmf.errors import ConfigError, DataError
from trainer.config import config_from_dict, load_config
from trainer.data.dataset import load_dataset, split_by_time
from trainer.encoding import encode_dataset, stage_examples
from trainer.ownership import entry_owner, mark_only_stage_trainable, owned_parameters
from trainer.pipeline import RunFolderError, train_run, warm_run
from trainer.warm import grow_model, grow_vocabs, run_warm

CUTOFF = 1_200  # day 1 = events before it (tiny timestamps run 1000..1292)
OLD_USERS, OLD_ITEMS = 30, 1_050  # day 1 knows users 1..30 and items 1000..1049
WITHDRAWN = 1_000  # an item day 2's catalogue no longer lists


def _write(folder: Path, events, users, items) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(events, folder / "events.parquet")
    pq.write_table(users, folder / "users.parquet")
    pq.write_table(items, folder / "items.parquet")
    return folder


@pytest.fixture(scope="module")
def days(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """day1: old users and items, events before CUTOFF; day2: every user and item (new ones
    included) but the withdrawn item, every event (the old ones shape histories and the split)."""
    root = tmp_path_factory.mktemp("days")
    ev = pq.read_table(tiny_data / "events.parquet").drop_columns(["request_id"])
    users, items = (
        pq.read_table(tiny_data / "users.parquet"),
        pq.read_table(tiny_data / "items.parquet"),
    )
    old = pc.and_(
        pc.and_(pc.less(ev["timestamp"], CUTOFF), pc.less_equal(ev["user_id"], OLD_USERS)),
        pc.less(ev["item_id"], OLD_ITEMS),
    )
    day1 = _write(
        root / "day1",
        ev.filter(old),
        users.filter(pc.less_equal(users["user_id"], OLD_USERS)),
        items.filter(pc.less(items["item_id"], OLD_ITEMS)),
    )
    keep = pc.not_equal(ev["item_id"], WITHDRAWN)
    day2 = _write(
        root / "day2",
        ev.filter(keep),
        users,
        items.filter(pc.not_equal(items["item_id"], WITHDRAWN)),
    )
    return day1, day2


def _quick(cfg_path: Path, *extra: str):
    return load_config(
        cfg_path, ["train.epochs=[2,2,2]", "train.ar_epochs=1", "train.threads=1", *extra]
    )


def _grown(ckpt, cfg, data: Path):
    """``ckpt``'s model grown to ``data``'s vocabularies (seeded) and ``data`` encoded for it."""
    ds = load_dataset(data, cfg.features, objectives=())
    uv, iv, _ = grow_vocabs(ckpt, ds, cfg.features.user, cfg.features.item)
    enc = encode_dataset(ds, cfg.features, split_by_time(ds.events), (uv, iv))
    torch.manual_seed(0)
    model = grow_model(ckpt, uv, iv)
    model.use_sparse_gradients(True)
    return model, enc


@pytest.fixture(scope="module")
def run1(days, tiny_config_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run1") / "run"
    train_run(_quick(tiny_config_path), days[0], out, log=lambda _: None, progress=False)
    return out


@pytest.fixture(scope="module")
def run2(run1, days, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run2") / "run"
    _, metrics = warm_run(run1, days[1], out, log=lambda _: None, progress=False)
    return out, metrics


def test_tables_grow_and_every_existing_entry_is_kept_bit_for_bit(run1, days, tiny_cfg):
    ckpt = load_checkpoint(run1)
    ds = load_dataset(days[1], ckpt.features, objectives=())
    uv, iv, grown = grow_vocabs(ckpt, ds, ckpt.features.user, ckpt.features.item)
    assert grown["user.id"] == 40 - OLD_USERS
    assert grown["item.id"] == 60 - (OLD_ITEMS - 1_000)
    # existing values keep their index: the old vocabulary is a prefix of the grown one
    assert uv.ids.values[: ckpt.user_vocab.ids.size] == ckpt.user_vocab.ids.values
    assert iv.ids.values[: ckpt.item_vocab.ids.size] == ckpt.item_vocab.ids.values
    torch.manual_seed(0)
    model = grow_model(ckpt, uv, iv)
    state = model.state_dict()
    grew = 0
    for name, old in ckpt.state_dict.items():
        new = state[name]
        if new.shape != old.shape:
            grew += 1
            assert torch.equal(new[: old.shape[0]], old), name
            assert new[old.shape[0] :].abs().sum() > 0, f"{name}: new rows not initialised"
        else:
            assert torch.equal(new, old), name
    assert grew >= 3  # user ids, item ids, the history table (item ids)


def test_warm_start_trains_only_the_new_events(run1, run2, days):
    out, metrics = run2
    since = load_checkpoint(run1).metrics["trained_through"]
    assert since is not None and since < CUTOFF
    ws = metrics["warm_start"]
    assert ws["since"] == since
    assert ws["absent_from_tables"] == {"users": 0, "items": 1}  # the withdrawn item keeps its row
    cfg = config_from_dict(load_checkpoint(out).train_config)
    ev = pq.read_table(days[1] / "events.parquet")
    split = split_by_time(ev, val_frac=cfg.split.val_frac, test_frac=cfg.split.test_frac)
    ts = ev["timestamp"].to_numpy()[split.train]
    clicked = ev["clicked"].to_numpy()[split.train]
    assert ws["new_positives"]["exposure"] == int((ts > since).sum())
    assert ws["new_positives"]["click"] == int(((ts > since) & clicked).sum())
    assert metrics["trained_through"] == int(ts.max())
    for rec in metrics["stages"]:
        assert rec["positives"] == ws["new_positives"][rec["objective"]]
        assert np.isfinite(rec["loss"][-1])


def test_each_stage_moves_only_its_own_units(run1, days, tiny_config_path):
    """Stage 0 alone fine-tunes: every entry owned by stages 1 and 2 stays bit-identical, and
    stage 0's own entries do move (the mask is not simply freezing everything)."""
    ckpt = load_checkpoint(run1)
    cfg = config_from_dict(ckpt.train_config, ["warm.epochs=[2,0,0]"])
    model, enc = _grown(ckpt, cfg, days[1])
    before = {n: p.detach().clone() for n, _, _, p in owned_parameters(model)}
    run_warm(model, enc, cfg, ckpt.metrics["trained_through"], log=lambda _: None, progress=False)
    moved_own = 0
    for name, module, attr, p in owned_parameters(model):
        owner = entry_owner(module, attr)
        others = owner != 0
        assert torch.equal(p.detach()[others], before[name][others]), name
        moved_own += int((p.detach()[~others] != before[name][~others]).sum())
    assert moved_own > 0


def test_the_warm_run_evaluates_and_continues_again(run2, days, tmp_path):
    """The grown run is a normal run: it evaluates on its dataset (the withdrawn item's row has
    unknown features) and a further warm start on the same data has nothing new to learn."""
    from trainer.pipeline import eval_run

    out, _ = run2
    result = eval_run(out)
    assert result["users"]["click"] > 0
    assert 0 < result["metrics"]["click"]["fused"]["recall"] <= 1
    with pytest.raises(DataError, match="nothing new"):
        warm_run(out, days[1], tmp_path / "again", log=lambda _: None, progress=False)
    assert not (tmp_path / "again" / "checkpoint.pt").exists()


def test_bad_input_is_refused_before_training_and_the_run_is_untouched(
    run1, days, tiny_config_path, tmp_path
):
    before = (run1 / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="leaves the previous one intact"):
        warm_run(run1, days[1], run1, log=lambda _: None, progress=False)
    other = load_config(tiny_config_path, ["features.user.id_dim=8"])
    with pytest.raises(ConfigError, match="other features"):
        warm_run(run1, days[1], tmp_path / "x", other, log=lambda _: None, progress=False)
    streamed = load_config(tiny_config_path, ["train.data='stream'"])
    with pytest.raises(ConfigError, match="in memory"):
        warm_run(run1, days[1], tmp_path / "y", streamed, log=lambda _: None, progress=False)
    assert (run1 / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_cli_warm_start_then_build_index(run1, days, tmp_path):
    """The real commands: csmf train --from, then build-index on the grown run."""
    csmf = [sys.executable, "-m", "csmf.cli"]
    out = tmp_path / "run"
    done = subprocess.run(
        [*csmf, "train", "--from", str(run1), "--data", str(days[1]), "--out", str(out),
         "--no-progress", "--set", "warm.epochs=1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warm start done" in done.stdout and "+10 users" in done.stdout
    bad = subprocess.run(
        [*csmf, "train", "--from", str(run1), "--out", str(tmp_path / "nodata")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "--from needs --data" in bad.stderr
    bundle = tmp_path / "bundle"
    built = subprocess.run(
        [*csmf, "build-index", "--run", str(out), "--out", str(bundle), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert (bundle / "manifest.json").exists()
    shutil.rmtree(bundle)


def test_table_rows_only_grow(run1):
    """A shrunken vocabulary cannot load a run's tables: refused with the parameter named."""
    ckpt = load_checkpoint(run1)
    small = type(ckpt.item_vocab)(
        ids=type(ckpt.item_vocab.ids)(ckpt.item_vocab.ids.values[:5]),
        categorical=ckpt.item_vocab.categorical,
        multi_hot=ckpt.item_vocab.multi_hot,
        numeric=ckpt.item_vocab.numeric,
    )
    with pytest.raises(ConfigError, match="cannot grow"):
        grow_model(ckpt, ckpt.user_vocab, small)


def test_replay_mixes_in_older_positives(run1, days):
    """warm.replay = r adds r older train positives per new one (as many as there are)."""
    ckpt = load_checkpoint(run1)
    cfg = config_from_dict(ckpt.train_config)
    ds = load_dataset(days[1], cfg.features, objectives=())
    uv, iv, _ = grow_vocabs(ckpt, ds, cfg.features.user, cfg.features.item)
    enc = encode_dataset(ds, cfg.features, split_by_time(ds.events), (uv, iv))
    since = ckpt.metrics["trained_through"]
    new = stage_examples(enc, "click", since)
    mixed = stage_examples(enc, "click", since, 0.5, np.random.default_rng(0))
    train = enc.split.train[enc.events.positive("click")[enc.split.train]]
    old = train[enc.events.ts[train] <= since]
    assert len(old) > 0 and len(mixed) == len(new) + min(len(old), round(0.5 * len(new)))
    pairs = lambda ex: sorted(zip(ex.user.tolist(), ex.item.tolist(), strict=True))  # noqa: E731
    old_pairs = set(zip(enc.events.user[old].tolist(), enc.events.item[old].tolist(), strict=True))
    extra = list(pairs(mixed))
    for p in pairs(new):  # every new positive is in the mix, the rest are older positives
        extra.remove(p)
    assert extra and set(extra) <= old_pairs


@pytest.mark.parametrize("scope", ["new-rows", "ids", "tables", "touched", "owned"])
def test_warm_train_scope_limits_what_moves(run1, days, scope):
    """warm.train = 'new-rows': only the rows this update grew move — every entry the previous
    run had stays bit-identical; 'tables' and 'touched': embedding rows move, the layers stay
    bit-identical; 'ids' (the default): id rows move, every existing category or history row and
    the layers stay; 'owned': the layers move too."""
    from trainer.warm import ITEM_ID_TABLE, USER_ID_TABLE

    ckpt = load_checkpoint(run1)
    cfg = config_from_dict(ckpt.train_config, [f"warm.train={scope}"])
    model, enc = _grown(ckpt, cfg, days[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_rows = {n: t.shape[0] for n, t in ckpt.state_dict.items() if t.dim() == 2}
    metrics = run_warm(
        model, enc, cfg, ckpt.metrics["trained_through"], lambda _: None, False, old_rows
    )
    moved = layers_moved = 0
    for name, p in model.named_parameters():
        now, was = p.detach(), before[name]
        if scope == "new-rows" and name in ckpt.state_dict:
            old = ckpt.state_dict[name].shape[0] if now.dim() == 2 else None
            assert torch.equal(now[:old], was[:old]), f"{name}: an existing entry moved"
            moved += int((now[old:] != was[old:]).sum()) if old is not None else 0
        elif scope == "ids" and ".tables." in name and name not in (ITEM_ID_TABLE, USER_ID_TABLE):
            old = ckpt.state_dict[name].shape[0]
            assert torch.equal(now[:old], was[:old]), f"{name}: a shared row moved"
        elif scope in ("tables", "touched", "ids") and ".layers." in name:
            assert torch.equal(now, was), f"{name}: a layer moved"
        elif scope == "owned" and ".layers." in name:
            layers_moved = layers_moved + int((now != was).sum())
        else:
            moved += int((now != was).sum())
    assert moved > 0  # the scope is not simply freezing everything
    assert (layers_moved > 0) == (scope == "owned")
    trainable = [rec["trainable"] for rec in metrics["stages"] if "trainable" in rec]
    assert trainable and all(n > 0 for n in trainable)


@pytest.mark.parametrize("moments", ["fresh", "carry"])
def test_touched_moves_only_the_items_the_new_positives_name(run1, days, moments):
    """Under the catalogue softmax every item is a negative of every batch: 'tables' moves id
    rows no new positive names, 'touched' leaves each of them bit-identical (carried moments
    included) while the named ones and the users' rows move."""
    from trainer import moments as saved_moments
    from trainer.encoding import OFFSET
    from trainer.warm import ITEM_ID_TABLE, USER_ID_TABLE

    ckpt = load_checkpoint(run1)
    carried = saved_moments.load(run1) if moments == "carry" else None
    since = ckpt.metrics["trained_through"]
    unnamed_moved = {}
    for scope in ("tables", "touched"):
        cfg = config_from_dict(
            ckpt.train_config,
            [f"warm.train={scope}", "loss.negatives=catalogue", f"warm.moments={moments}"],
        )
        model, enc = _grown(ckpt, cfg, days[1])
        named = torch.zeros(enc.n_items, dtype=torch.bool)
        for o in cfg.objectives:
            named |= stage_examples(enc, o, since).item_prob > 0
        params = dict(model.named_parameters())
        items, users = params[ITEM_ID_TABLE], params[USER_ID_TABLE]
        item_before, user_before = items.detach().clone(), users.detach().clone()
        run_warm(model, enc, cfg, since, lambda _: None, False, carried=carried)
        row_moved = (items.detach() != item_before).any(1)[OFFSET : OFFSET + enc.n_items]
        assert bool(row_moved[named].any()) and not torch.equal(users.detach(), user_before)
        assert bool((~named).any())
        unnamed_moved[scope] = int(row_moved[~named].sum())
    assert unnamed_moved["tables"] > 0 and unnamed_moved["touched"] == 0


def test_row_limited_carry_needs_row_wise_tables(tiny_config_path):
    with pytest.raises(ConfigError, match="needs train.id_tables = 'row-wise'"):
        load_config(
            tiny_config_path,
            ["warm.train=touched", "warm.moments=carry", "train.id_tables=dense"],
        )


def test_warm_train_scope_must_be_known(tiny_config_path):
    with pytest.raises(ConfigError, match="warm.train must be one of"):
        load_config(tiny_config_path, ["warm.train=everything"])


def test_the_run_keeps_moments_and_the_warm_start_carries_them(run1, run2, days, tmp_path):
    """run1 keeps each stage's final moments; the warm start loads them into every stage's
    optimizer — old rows as saved, grown rows at zero — and keeps its own for the next day."""
    from trainer import moments

    saved = moments.load(run1)
    ckpt = load_checkpoint(run1)
    assert sorted(saved) == [str(t) for t in range(len(ckpt.objectives))]
    out, metrics = run2  # the default: fresh optimizers, moments still kept for the next day
    assert not any(rec.get("moments_carried") for rec in metrics["stages"])
    assert sorted(moments.load(out)) == sorted(saved)
    cfg = config_from_dict(ckpt.train_config, ["warm.moments=carry"])
    _, metrics = warm_run(
        run1, days[1], tmp_path / "carry", cfg, log=lambda _: None, progress=False
    )
    assert all(rec.get("moments_carried") for rec in metrics["stages"] if rec["loss"])

    model, _ = _grown(ckpt, cfg, days[1])
    opt = mark_only_stage_trainable(model, 1).optimizer(0.01)
    assert moments.restore(model, 1, opt, saved["1"])
    p = model.item.tables["id"].weight
    rec = saved["1"]["item.tables.id.weight"]
    state, old = opt.state_of(p), ckpt.state_dict["item.tables.id.weight"].shape[0]
    assert state["step"] == rec["step"] > 0
    assert torch.equal(state["exp_avg_sq"][:old, rec["cols"]], rec["exp_avg_sq"])
    assert state["exp_avg_sq"][old:].abs().sum() == 0  # new items: no history
    others = torch.ones(p.shape[1], dtype=torch.bool)
    others[rec["cols"]] = False
    assert state["exp_avg_sq"][:, others].abs().sum() == 0  # other stages' columns


def test_a_run_without_moments_warm_starts_fresh_and_bad_moments_are_refused(run1, days, tmp_path):
    from trainer.moments import MOMENTS_NAME, MomentsError

    old = tmp_path / "old"
    shutil.copytree(run1, old)
    (old / MOMENTS_NAME).unlink()  # a run from before moments were kept
    lines: list[str] = []
    carry = config_from_dict(load_checkpoint(run1).train_config, ["warm.moments=carry"])
    _, metrics = warm_run(old, days[1], tmp_path / "a", carry, log=lines.append, progress=False)
    assert any("kept no optimizer moments" in line for line in lines)
    assert not any(rec.get("moments_carried") for rec in metrics["stages"])

    (old / MOMENTS_NAME).write_bytes(b"not a torch file")
    with pytest.raises(MomentsError, match=MOMENTS_NAME):
        warm_run(old, days[1], tmp_path / "b", carry, log=lambda _: None, progress=False)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="warm.moments must be one of"):
        config_from_dict(load_checkpoint(run1).train_config, ["warm.moments=some"])


def test_save_moments_off_writes_no_moments_file(run1, days, tmp_path):
    from trainer.moments import MOMENTS_NAME

    cfg = config_from_dict(load_checkpoint(run1).train_config, ["train.save_moments=false"])
    out = tmp_path / "run"
    _, metrics = warm_run(run1, days[1], out, cfg, log=lambda _: None, progress=False)
    assert not (out / MOMENTS_NAME).exists()
    assert "moments" not in metrics and "moments" not in load_checkpoint(out).metrics
