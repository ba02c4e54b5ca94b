"""Which engine trains the id tables: side by side, per optimizer step (lookup of 4,096 rows +
backward + update) on one table of N rows × 32 columns, 2 threads, on this CPU.

- ``torch dense + Adam``: the trainer's earlier path (whole-table gradient and moments);
- ``torch row-wise + SparseAdam``: the trainer's path (``train.id_tables = "row-wise"``): a
  row-sparse gradient, masked by column, then lazy Adam on the touched rows;
- ``torch row-wise + sparse Adagrad``: the same gradient, torch's Adagrad (sparse support);
- ``FBGEMM TBE + fused <opt>``: TorchRec's kernel (``SplitTableBatchedEmbeddingBagsCodegen``, CPU
  build ``fbgemm-gpu-cpu``), the update fused into backward: exact row-wise Adagrad (one float
  of state per row) and Adam;
- ``FBGEMM TBE, owner blocks``: the way to honour CSMF's column ownership with fused updates —
  only the stage's own columns (here half of them) in a TBE, the frozen columns a constant tensor
  looked up beside it.

Each variant also reports whether rows a step did not look up (but earlier steps did) kept their
parameters and optimizer state through that step — dense Adam's momentum moves them — and, for
the masked torch path, whether masked columns stayed bit-identical.

    # torchrec/fbgemm need their own venv (not project dependencies):
    python -m venv .cache/trvenv && .cache/trvenv/bin/pip install torch==2.13.0
    .cache/trvenv/bin/pip install torchrec==1.8.0 && .cache/trvenv/bin/pip uninstall -y fbgemm_gpu
    .cache/trvenv/bin/pip install --no-deps fbgemm-gpu-cpu==1.8.0
    PYTHONPATH=. .cache/trvenv/bin/python bench/embedding_engines.py --rows 1000000 --rows 10000000

Without fbgemm the FBGEMM rows are skipped (the torch rows still run in the project venv).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from csmf.results import script_command, table, write_results

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
DIM, BATCH = 32, 4096


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Variant:
    """setup(rows) → (step(idx), state probe for untouched-row checks)."""

    def __init__(self, name: str, build: Callable[[int], tuple[Callable, Callable]]) -> None:
        self.name, self.build = name, build


def torch_dense(rows: int):
    w = torch.nn.Parameter(torch.randn(rows, DIM).mul_(0.05))
    opt = torch.optim.Adam([w], lr=1e-3)

    def step(idx: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.embedding(idx, w).pow(2).sum().backward()
        opt.step()

    return step, lambda: (w, opt.state.get(w, {}).get("exp_avg"))


def torch_rowwise(opt_name: str):
    def build(rows: int):
        w = torch.nn.Parameter(torch.randn(rows, DIM).mul_(0.05))
        mask = torch.ones(1, DIM)
        mask[:, : DIM // 2] = 0  # half the columns frozen (an earlier objective's)
        opt = (
            torch.optim.SparseAdam([w], lr=1e-3)
            if opt_name == "adam"
            else torch.optim.Adagrad([w], lr=1e-2)
        )

        def step(idx: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            F.embedding(idx, w, sparse=True).pow(2).sum().backward()
            g = w.grad.coalesce()
            g.values().mul_(mask)
            w.grad = g
            opt.step()

        state = "exp_avg" if opt_name == "adam" else "sum"
        return step, lambda: (w, opt.state.get(w, {}).get(state))

    return build


def fbgemm(opt_name: str, owner_blocks: bool = False):
    def build(rows: int):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        dim = DIM // 2 if owner_blocks else DIM
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=getattr(EmbOptimType, opt_name),
            learning_rate=1e-2,
            device="cpu",
        )
        frozen = torch.randn(rows, DIM - dim).mul_(0.05) if owner_blocks else None
        offsets = torch.arange(BATCH + 1, dtype=torch.int64)

        def step(idx: torch.Tensor) -> None:
            out = tbe(idx, offsets)  # (B, dim), the update happens in backward
            if frozen is not None:
                out = torch.cat([F.embedding(idx, frozen), out], 1)
            out.pow(2).sum().backward()

        def probe():
            w = tbe.split_embedding_weights()[0]
            states = (
                tbe.split_optimizer_states()[0] if hasattr(tbe, "split_optimizer_states") else []
            )
            return w, (states[0] if states else None)

        return step, probe

    return build


VARIANTS = [
    Variant("torch dense + Adam (earlier trainer)", torch_dense),
    Variant("torch row-wise + SparseAdam, column mask (trainer)", torch_rowwise("adam")),
    Variant("torch row-wise + sparse Adagrad, column mask", torch_rowwise("adagrad")),
    Variant("FBGEMM TBE + fused exact row-wise Adagrad", fbgemm("EXACT_ROWWISE_ADAGRAD")),
    Variant("FBGEMM TBE + fused Adam", fbgemm("ADAM")),
    Variant(
        "FBGEMM TBE, owner blocks (16 trainable cols) + row-wise Adagrad",
        fbgemm("EXACT_ROWWISE_ADAGRAD", owner_blocks=True),
    ),
]


def measure(v: Variant, rows: int, steps: int, max_step_s: float) -> dict:
    torch.manual_seed(0)
    before = rss_mb()
    try:
        step, probe = v.build(rows)
    except Exception as exc:  # noqa: BLE001 — an engine that cannot run here is a result
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    gen = torch.Generator().manual_seed(1)
    times: list[float] = []
    try:
        for k in range(steps + 2):
            idx = torch.randint(0, rows, (BATCH,), generator=gen)
            t0 = time.perf_counter()
            step(idx)
            dt = time.perf_counter() - t0
            if k >= 2 or dt > max_step_s:
                times.append(dt)
            if dt > max_step_s:  # one slow step is the answer
                break
        w, state = probe()
        w0 = w.detach()[: rows // 2].clone()  # the lower half, looked up before but not now
        s0 = state.detach()[: rows // 2].clone() if state is not None else None
        step(torch.randint(rows // 2, rows, (BATCH,), generator=gen))
        w, state = probe()
        untouched = torch.equal(w.detach()[: rows // 2], w0) and (
            s0 is None or torch.equal(state.detach()[: rows // 2], s0)
        )
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {
        "ms_per_step": 1000 * statistics.median(times),
        "steps": len(times),
        "rss_growth_mb": rss_mb() - before,
        "untouched_rows_unchanged": bool(untouched),
    }


def frozen_columns_stay(rows: int = 10_000) -> bool:
    """The trainer's masked SparseAdam leaves masked columns bit-identical over many steps."""
    step, probe = torch_rowwise("adam")(rows)
    w0 = probe()[0].detach()[:, : DIM // 2].clone()
    for _ in range(20):
        step(torch.randint(0, rows, (BATCH,)))
    return torch.equal(probe()[0].detach()[:, : DIM // 2], w0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, action="append", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-step-s", type=float, default=20.0, help="stop a variant after one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for rows in args.rows or [1_000_000]:
        for v in VARIANTS:
            r = {"rows": rows, "variant": v.name, "load": os.getloadavg()[0]}
            r.update(measure(v, rows, args.steps, args.max_step_s))
            print(r, flush=True)
            results.append(r)
    doc = {
        "rows": results,
        "frozen_columns_bit_identical": frozen_columns_stay(),
        "threads": args.threads,
        "batch": BATCH,
        "dim": DIM,
        "torch": torch.__version__,
        "loadavg": {"before": load_before, "after": os.getloadavg()},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    try:
        import fbgemm_gpu
        import torchrec

        doc["versions"] = {"torchrec": torchrec.__version__, "fbgemm_gpu": fbgemm_gpu.__version__}
    except ImportError:
        doc["versions"] = {"torchrec": None, "fbgemm_gpu": None}
    md, _ = write_results(
        RESULTS / "embedding-engines", "Id-table engines on this CPU", script_command(__file__),
        render(doc), doc,
    )  # fmt: skip
    print(md.read_text())


def render(doc: dict) -> list[str]:
    la = doc["loadavg"]
    lines = [
        f"One table × {doc['dim']} columns, {doc['batch']:,} lookups per step (uniform ids), "
        f"forward + backward + update, median over the steps after 2 "
        f"warm-up steps, {doc['threads']} threads; torch {doc['torch']}, "
        f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}; load average "
        f"{la['before'][0]:.1f} before / {la['after'][0]:.1f} after, {doc['when']}.",
        "",
    ]
    lines += table(
        [
            "rows",
            "engine",
            "ms / step",
            "RSS growth MB",
            "rows not looked up: unchanged",
            "load",
        ],  # fmt: skip
        (
            [
                f"{r['rows']:,}",
                r["variant"],
                f"{r['ms_per_step']:,.1f}" if "ms_per_step" in r else r.get("error", "—"),
                f"{r.get('rss_growth_mb', 0):,.0f}" if "ms_per_step" in r else "—",
                str(r.get("untouched_rows_unchanged", "—")),
                f"{r['load']:.1f}",
            ]  # fmt: skip
            for r in doc["rows"]
        ),
        "llrrll",
    )
    lines += [
        "",
        f"Masked columns bit-identical after 20 SparseAdam steps (the trainer's path): "
        f"{doc['frozen_columns_bit_identical']}.",
        "",
        *DECISION,
    ]
    return lines


DECISION = [
    "**Decision: torch's row-sparse gradients with SparseAdam, not TorchRec/FBGEMM.** On this CPU "
    "the fused FBGEMM kernel is not faster than torch's sparse path (the table above, same run), "
    "and it would cost the cascade its invariants' simplest form: the fused update happens "
    "inside backward, with no point between gradient and update where CSMF's column mask can "
    "go, so ownership would need one table per owner block, rebuilt and copied whenever CPP "
    "hands units to the next objective; FBGEMM's Adam is not implemented for CPU (the error "
    "above), so the fused choice is row-wise Adagrad, a different optimizer whose learning rates "
    "would need re-tuning on validation. The torch path keeps Adam's semantics (lazily, on the "
    "rows a batch touched), masks columns on the gradient's values, costs the same per step at "
    "10M rows as at 1M, and moved no quality cell by more than one std on ML-100K "
    "([quality-ml-100k-row-wise.md](quality-ml-100k-row-wise.md)). What FBGEMM does better is "
    "memory: row-wise Adagrad keeps one float of state per row where SparseAdam keeps two per "
    "entry (RSS growth column). A row-wise Adagrad option for tables whose optimizer state does "
    "not fit is the next step if memory, not time, becomes the limit; sharding rows across "
    "ranks (DistributedModelParallel) is the other.",
    "",
]


if __name__ == "__main__":
    main()
