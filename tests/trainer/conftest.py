"""A tiny real dataset (written once per session), its encoding, one short real cascade trained
on it, and the paper's baselines trained on it once per session (shared by test_baselines.py and
test_paper_baselines.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from csmf.checkpoint import new_model
from csmf.towers import TwoTower
from trainer.baselines import dmmp, dtml, moppr, mvke, teacher, with_changes
from trainer.cascade import probe_scores, run_cascade
from trainer.config import RunConfig, load_config
from trainer.encoding import Encoded
from trainer.ownership import entry_owner, owned_parameters
from trainer.pipeline import prepare

TINY_TOML = """
[features.user]
fields = [
  { name = "seg", kind = "categorical", dim = 4 },
  { name = "age", kind = "numeric" },
]
history = { max_len = 6, dim = 8 }
[features.item]
fields = [
  { name = "topic", kind = "categorical", dim = 4 },
  { name = "tags", kind = "multi_hot", dim = 4, max_len = 3 },
]
[model]
out_dim = 16
hidden = [32, 16]
[cascade]
tau = 0.6
rho = 0.5
[loss]
request_negatives = 2
extra_negatives = 8
[train]
batch_size = 64
epochs = [3, 3, 3]
ar_epochs = 1
lr = 0.01
[split]
val_frac = 0.1
test_frac = 0.2
"""


def make_tiny_dataset(root: Path, n_users: int = 40, n_items: int = 60, seed: int = 0) -> Path:
    """Users and items in 3 segments/topics; users mostly see, click and buy their own topic."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    seg = rng.integers(0, 3, n_users)
    topic = rng.integers(0, 3, n_items)
    rows = {
        k: [] for k in ("user_id", "item_id", "timestamp", "clicked", "converted", "request_id")
    }
    cand_req, cand_item = [], []
    request = 0
    for u in range(n_users):
        affinity = np.where(topic == seg[u], 2.0, -1.0) + rng.normal(0, 0.5, n_items)
        p = np.exp(affinity) / np.exp(affinity).sum()
        seen = rng.choice(n_items, size=30, replace=False, p=p)
        for k, i in enumerate(seen):
            if k % 5 == 0:
                request += 1
                unseen = np.setdiff1d(np.arange(n_items), seen)
                for j in rng.choice(unseen, 3, replace=False):
                    cand_req.append(request)
                    cand_item.append(int(j) + 1000)
            clicked = bool(rng.random() < (0.8 if topic[i] == seg[u] else 0.15))
            rows["user_id"].append(u + 1)
            rows["item_id"].append(int(i) + 1000)
            rows["timestamp"].append(1_000 + 10 * k + (u % 3))
            rows["clicked"].append(clicked)
            rows["converted"].append(clicked and bool(rng.random() < 0.5))
            rows["request_id"].append(request)
    pq.write_table(pa.table(rows), root / "events.parquet")
    pq.write_table(
        pa.table({"request_id": cand_req, "item_id": cand_item}), root / "candidates.parquet"
    )
    pq.write_table(
        pa.table(
            {
                "user_id": np.arange(1, n_users + 1),
                "seg": [f"s{s}" for s in seg],
                "age": rng.normal(35, 10, n_users),
            }
        ),
        root / "users.parquet",
    )
    tags = [["a", "b", "c", "d"][: 1 + (i % 3)] for i in range(n_items)]
    pq.write_table(
        pa.table(
            {
                "item_id": np.arange(n_items) + 1000,
                "topic": [f"t{t}" for t in topic],
                "tags": tags,
                "title": [f"item {i}" for i in range(n_items)],
            }
        ),
        root / "items.parquet",
    )
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="session")
def tiny_cfg(tiny_config_path) -> RunConfig:
    return load_config(tiny_config_path)


@dataclass
class Trained:
    cfg: RunConfig
    enc: Encoded
    model: TwoTower
    metrics: dict
    # after stage t froze: every parameter entry owned <= t, and s_t on a probe set
    frozen: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    probe: tuple[np.ndarray, np.ndarray]
    probe_scores: list[torch.Tensor]


@pytest.fixture(scope="session")
def trained(tiny_cfg, tiny_data) -> Trained:
    torch.manual_seed(0)
    enc = prepare(tiny_cfg, tiny_data)
    model = new_model(tiny_cfg.model, tiny_cfg.features, enc.user_vocab, enc.item_vocab)
    rng = np.random.default_rng(1)
    probe = (rng.integers(0, enc.n_users, 64), rng.integers(0, enc.n_items, 64))
    frozen, scores = [], []

    def record(t: int, m: TwoTower) -> None:
        snap = {}
        for name, module, attr, p in owned_parameters(m):
            mask = entry_owner(module, attr) <= t
            snap[name] = (mask.clone(), p.detach()[mask].clone())
        frozen.append(snap)
        scores.append(probe_scores(m, enc, probe)[:, t].clone())

    metrics = run_cascade(
        model, enc, tiny_cfg, log=lambda _: None, progress=False, on_freeze=record
    )
    return Trained(tiny_cfg, enc, model, metrics, frozen, probe, scores)


@pytest.fixture(scope="session")
def tiny_enc(tiny_cfg, tiny_data) -> Encoded:
    """The tiny dataset encoded with the tiny config (tests only read it)."""
    return prepare(tiny_cfg, tiny_data)


class PaperBaselines:
    """MVKE, DMMP, DTML, MOPPR and the distillation teacher, each trained by its own trainer
    function at most once per session on (``cfg``, ``enc``): the tests of their internals and
    the tests that run them through ``run_method`` share one trained model. Trained models are
    only read (evaluation mode, no gradients) by the tests."""

    TRAIN = {
        "mvke": mvke.train_mvke,
        "dmmp": dmmp.train_dmmp,
        "dtml": dtml.train_dtml,
        "moppr": moppr.train_moppr,
    }

    def __init__(self, cfg: RunConfig, enc: Encoded) -> None:
        self.cfg, self.enc = cfg, enc
        self._trained: dict[str, tuple] = {}

    def __call__(self, method: str) -> tuple:
        """(model, info) of ``method``'s trainer on (cfg, enc)."""
        if method not in self._trained:
            self._trained[method] = self.TRAIN[method](self.cfg, self.enc)
        return self._trained[method]

    def teacher(self) -> tuple:
        """(teacher, epoch losses): ``train_teacher(cfg, enc, shared=1, specific=1)``."""
        if "teacher" not in self._trained:
            self._trained["teacher"] = teacher.train_teacher(self.cfg, self.enc, 1, 1)
        return self._trained["teacher"]


@pytest.fixture(scope="session")
def paper_baselines(tiny_cfg, tiny_enc) -> PaperBaselines:
    """Trained on the tiny config with 4 epochs per stage (enough for every loss to fall)."""
    return PaperBaselines(with_changes(tiny_cfg, {"train": {"epochs": [4, 4, 4]}}), tiny_enc)
