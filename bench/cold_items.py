"""What serving new items from their features is worth: ML-100K with 10 % of the items held out of
training, served only as cold items (item tower over their features, id slot at the model's
unknown row — what ``csmf items encode`` and ``PUT /v1/admin/items`` do for ids the model does
not know), against popularity and against the same items trained warm.

Per seed: a seeded random 10 % of the catalogue is removed from the dataset (its events and its
item rows), and CSMF trains on the rest ("cold" run); the "warm" run trains on the whole dataset
with the same training seed. Both are scored on the whole dataset's test split, on the held-out
items' test clicks and conversions only (fused ranker, the config's ``eval.weights``):

- ``among held-out``: each user's ranking over the held-out items only (the question a new-item
  slot answers: which of the new items);
- ``full catalogue``: each user's ranking over every item (warm items with the model's vectors,
  held-out items with their cold vectors), Recall / nDCG of the held-out targets: how well new
  items compete with the trained catalogue.

Items the user had in the train period are excluded, as in ``csmf eval``. Popularity ranks by the
train-period counts of the whole dataset — counts a truly new item would not have, so it is an
oracle bound. Each run's user vectors come from its own dataset's train split (the cold run's
histories lack the held-out items, as a served user's history would map them to the unknown
row).

    python bench/cold_items.py --data data/ml-100k --seeds 0 1 2 --set train.threads=1 --jobs 2

Trained runs are cached under ``.cache/cold-items/KEY`` (KEY: :func:`bench.harness.cache.key_of`
of the dataset fingerprint, the config, the overrides, the hold-out share and the seed). Writes
``bench/results/cold-items-ml-100k.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.harness.cache import bench_fingerprint, key_of
from csmf.results import run_info

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "cold-items"
TARGETS = ("click", "conversion")


def held_items(items: pa.Table, share: float, seed: int) -> list[str]:
    """A seeded random ``share`` of the catalogue's item ids (sorted)."""
    ids = sorted(str(i) for i in items.column("item_id").to_pylist())
    n = round(share * len(ids))
    pick = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in pick)


def write_without(data: Path, out: Path, held: list[str]) -> None:
    """A copy of the dataset folder without the ``held`` items (their events and item rows)."""
    if (out / "dataset.json").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    value_set = pa.array(held, pa.string())
    for name in ("events.parquet", "items.parquet"):
        t = pq.read_table(data / name)
        keep = pc.invert(pc.is_in(pc.cast(t.column("item_id"), pa.string()), value_set))
        pq.write_table(t.filter(keep), tmp / name)
    shutil.copy(data / "users.parquet", tmp / "users.parquet")
    meta = json.loads((data / "dataset.json").read_text())
    meta["held_out_items"] = len(held)
    meta.pop("counts", None)
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train_cmd(config: Path, data: Path, out: Path, seed: int, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "csmf.cli", "train", "--config", str(config)]
    cmd += ["--data", str(data), "--out", str(out), "--force", "--seed", str(seed), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return ["nice", "-n", "10", *cmd]


def plan(args: argparse.Namespace) -> list[dict]:
    """Per seed: the held-out ids, the two run folders, their training commands."""
    fp = bench_fingerprint(args.data)
    config = args.config or ROOT / "configs" / f"{args.data.resolve().name}.toml"
    cfg_text = Path(config).read_text()
    items = pq.read_table(args.data / "items.parquet")
    out = []
    for seed in args.seeds:
        parts = {"dataset": fp, "config": cfg_text, "sets": args.sets, "holdout": args.holdout}
        key = key_of({**parts, "seed": seed})[:12]
        folder = CACHE / key
        held = held_items(items, args.holdout, seed)
        cold_data = folder / "data-without-held"
        runs = {"warm": (args.data, folder / "warm"), "cold": (cold_data, folder / "cold")}
        out.append({"seed": seed, "key": key, "held": held, "folder": folder, "runs": runs,
                    "config": Path(config)})  # fmt: skip
    return out


def train_all(jobs: list[dict], sets: list[str], parallel: int) -> None:
    pending = []
    for j in jobs:
        j["folder"].mkdir(parents=True, exist_ok=True)
        (j["folder"] / "held.json").write_text(json.dumps(j["held"]))
        write_without(j["runs"]["warm"][0], j["runs"]["cold"][0], j["held"])
        for _, (data, run) in j["runs"].items():
            if not (run / "checkpoint.pt").exists():
                pending.append(train_cmd(j["config"], data, run, j["seed"], sets))
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            log = Path(cmd[cmd.index("--out") + 1]).with_suffix(".log")
            print("train:", " ".join(cmd[3:]), flush=True)
            running.append(subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT))
        time.sleep(5)  # a poll of child processes, not a wait for a condition we could observe
        for p in list(running):
            if p.poll() is not None:
                running.remove(p)
                if p.returncode:
                    raise SystemExit(f"training failed ({p.returncode}): {' '.join(p.args)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    os.chdir(ROOT)
    info = run_info(ROOT, ("csmf", "trainer"))
    jobs = plan(args)
    train_all(jobs, args.sets, args.jobs)
    if args.train_only:
        return
    from cold_items_eval import evaluate_and_write  # torch: after training

    evaluate_and_write(args, jobs, info)


if __name__ == "__main__":
    main()
