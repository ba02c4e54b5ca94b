"""A plain two-tower trainer, the yardstick of ``bench/train_scale.py scale``: what a recsys
engineer would write in ~100 lines for the same data, without CSMF's ownership, cascade or
evaluation. Id embeddings (32 dims, ``sparse=True``) + the dataset's categorical features
(16 dims each) → MLP 256-128-64 per tower, in-batch softmax with log-Q, SparseAdam for the
tables and Adam for the MLPs; events streamed from the dataset's Parquet row groups through a
shuffle buffer, in the training loop (no prefetch thread).

    python bench/reference_two_tower.py --data data/synth-1m --steps 20 --batch-size 4096

Prints one JSON line: examples/s over the timed steps (after 2 warm-up steps), peak RSS.
Synthetic ids are 0..n-1 integers, used directly as rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn


class Tower(nn.Module):
    def __init__(self, n_ids: int, cats: list[int], hidden=(256, 128), out: int = 64) -> None:
        super().__init__()
        self.ids = nn.Embedding(n_ids, 32, sparse=True)
        self.cats = nn.ModuleList(nn.Embedding(n, 16, sparse=True) for n in cats)
        widths = [32 + 16 * len(cats), *hidden, out]
        self.mlp = nn.Sequential()
        for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
            self.mlp.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                self.mlp.append(nn.ReLU())
        nn.init.normal_(self.ids.weight, std=0.05)

    def forward(self, ids: torch.Tensor, cats: list[torch.Tensor]) -> torch.Tensor:
        x = [self.ids(ids), *(t(c) for t, c in zip(self.cats, cats, strict=True))]
        return self.mlp(torch.cat(x, 1))


def codes(table, columns: list[str]) -> tuple[list[np.ndarray], list[int]]:
    """Each string column as integer codes (row-aligned with the table) and its cardinality."""
    out, sizes = [], []
    for c in columns:
        enc = pc.dictionary_encode(table[c]).combine_chunks()
        out.append(enc.indices.to_numpy().astype(np.int64))
        sizes.append(len(enc.dictionary))
    return out, sizes


def batches(files: list[Path], batch_size: int, buffer: int, rng: np.random.Generator):
    """(user, item) int64 arrays of batch_size rows, shuffled through a buffer."""
    buf_u, buf_i = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(65_536, columns=["user_id", "item_id"]):
            buf_u = np.concatenate([buf_u, rb.column(0).to_numpy()])
            buf_i = np.concatenate([buf_i, rb.column(1).to_numpy()])
            if len(buf_u) >= buffer:
                perm = rng.permutation(len(buf_u))
                buf_u, buf_i = buf_u[perm], buf_i[perm]
                n = (len(buf_u) - buffer // 2) // batch_size * batch_size
                for lo in range(0, n, batch_size):
                    yield buf_u[lo : lo + batch_size], buf_i[lo : lo + batch_size]
                buf_u, buf_i = buf_u[n:], buf_i[n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=262_144)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    users, items = (
        pq.read_table(args.data / "users.parquet"),
        pq.read_table(args.data / "items.parquet"),
    )
    ucats, usizes = codes(users, ["segment", "region"])
    icats, isizes = codes(items, ["topic", "price_bucket"])
    ucats = [torch.as_tensor(c) for c in ucats]
    icats = [torch.as_tensor(c) for c in icats]
    user, item = Tower(users.num_rows, usizes), Tower(items.num_rows, isizes)
    files = sorted((args.data / "events").glob("part-*.parquet")) or [args.data / "events.parquet"]
    counts = np.zeros(items.num_rows, np.int64)
    for f in files:  # item frequencies for log-Q
        counts += np.bincount(
            pq.read_table(f, columns=["item_id"])["item_id"].to_numpy(), minlength=len(counts)
        )
    log_prob = torch.as_tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32)
    sparse_ids = {
        id(p)
        for m in (user, item)
        for e in m.modules()
        if isinstance(e, nn.Embedding)
        for p in e.parameters()
    }
    sparse = [p for m in (user, item) for p in m.parameters() if id(p) in sparse_ids]
    dense = [p for m in (user, item) for p in m.parameters() if id(p) not in sparse_ids]
    opt_s, opt_d = torch.optim.SparseAdam(sparse, lr=2e-3), torch.optim.Adam(dense, lr=2e-3)
    rng = np.random.default_rng(0)
    it = batches(files, args.batch_size, args.buffer, rng)
    start, done = None, 0
    for step in range(args.steps + 2):
        if step == 2:
            start = time.perf_counter()
        u, i = (torch.as_tensor(x) for x in next(it))
        e = user(u, [c[u] for c in ucats])
        v = item(i, [c[i] for c in icats])
        logits = e @ v.T / 0.1 - log_prob[i].unsqueeze(0) - np.log(len(i))
        loss = F.cross_entropy(logits, torch.arange(len(u)))
        opt_s.zero_grad()
        opt_d.zero_grad()
        loss.backward()
        opt_s.step()
        opt_d.step()
        done += len(u) if step >= 2 else 0
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"examples_per_s": done / seconds, "steps": args.steps, "seconds": seconds,
                      "peak_rss_mb": round(rss, 1), "loss": loss.item()}))  # fmt: skip


if __name__ == "__main__":
    main()
