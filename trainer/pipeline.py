"""Run-level glue shared by the CLI and the report: dataset → encoded tensors → cascade →
checkpoint, and checkpoint → evaluation table.

A run folder holds ``checkpoint.pt`` (csmf.checkpoint format; ``dataset`` = absolute path of the
dataset folder), ``train_metrics.json`` and, after ``csmf eval``, ``eval.json``. While a run is
unfinished it holds ``resume.pt`` instead: model, optimizer, RNG states and the stage machine's
position at the last epoch or stage boundary, written atomically (``csmf train --resume``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

import csmf.objectives as funnel
from csmf.atomic import write_json
from csmf.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    atomic_save,
    dataset_files,
    dataset_fingerprint,
    load_checkpoint,
    load_versioned,
    new_model,
    save_checkpoint,
    training_provenance,
)
from csmf.errors import ConfigError, CsmfError, DataError
from csmf.features import TowerVocab
from csmf.results import table
from csmf.towers import ModelConfig
from csmf.weights import parse_weights
from trainer import moments
from trainer.cascade import Log, Phase, Progress, output_slices, run_cascade
from trainer.config import RunConfig
from trainer.data.dataset import load_dataset, split_by_time
from trainer.distributed import SINGLE, Dist
from trainer.encoding import Encoded, encode_dataset, with_absent_rows
from trainer.evaluate import evaluate_model
from trainer.warm import (
    grow_model,
    grow_vocabs,
    new_positives,
    run_warm,
    trained_through,
    warm_config,
)

TRAIN_METRICS = "train_metrics.json"
EVAL_NAME = "eval.json"
RESUME_NAME = "resume.pt"  # the last epoch/stage boundary of an unfinished run
RESUME_FORMAT = 1


def prepare(
    cfg: RunConfig, data: str | Path, vocabs=None, *, stream: bool = False, dist: Dist = SINGLE
) -> Encoded:
    """Load, validate, split and encode a dataset folder for ``cfg`` (and apply its threads);
    ``stream``: out of core (trainer.data.stream), each rank reading its own shard."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if stream:
        from trainer.data.stream import open_stream

        return open_stream(
            data, cfg.features, cfg.objectives, asdict(cfg.split), vocabs=vocabs,
            rank=dist.rank, world=dist.world, shuffle_buffer=cfg.train.shuffle_buffer,
            cache_examples=cfg.train.cache_examples, val_users=cfg.eval.val_users, dist=dist,
        )  # fmt: skip
    ds = load_dataset(data, cfg.features, objectives=cfg.objectives)
    split = split_by_time(ds.events, **asdict(cfg.split))
    return encode_dataset(ds, cfg.features, split, vocabs)


def use_stream(cfg: RunConfig, data: str | Path) -> bool:
    """``train.data``: 'stream', 'memory', or 'auto' = stream above ``train.stream_above`` events
    (counted from the Parquet footers)."""
    if cfg.train.data != "auto":
        return cfg.train.data == "stream"
    from trainer.data.stream import count_events

    try:
        return count_events(data) > cfg.train.stream_above
    except CsmfError:
        return False  # let the loader report the problem


class RunFolderError(CsmfError, ValueError):
    """A run folder holds a finished or interrupted run that would be overwritten."""


def resolve_device(name: str) -> torch.device:
    """``train.device`` → a torch device ('auto': CUDA when available). Under torchrun each
    process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device = 'cuda' but torch sees no CUDA device "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def check_run_folder(out: Path, force: bool) -> None:
    """Refuse to overwrite a finished or interrupted run unless ``force`` (then clear it)."""
    finished, partial = (out / CHECKPOINT_NAME).exists(), (out / RESUME_NAME).exists()
    if not force:
        if finished:
            raise RunFolderError(
                f"run folder {out} already holds a finished run ({CHECKPOINT_NAME}); "
                "pass --force to overwrite it or choose another --out"
            )
        if partial:
            raise RunFolderError(
                f"run folder {out} holds an interrupted run ({RESUME_NAME}); continue it with "
                f"`csmf train --resume {out}` or pass --force to start over"
            )
        return
    for name in (CHECKPOINT_NAME, RESUME_NAME, TRAIN_METRICS, EVAL_NAME, moments.MOMENTS_NAME):
        (out / name).unlink(missing_ok=True)


def train_run(
    cfg: RunConfig,
    data: str | Path,
    out: str | Path,
    log: Log = print,
    progress: bool = True,
    *,
    force: bool = False,
    dist: Dist = SINGLE,
) -> tuple[Path, dict]:
    """Train the cascade on ``data`` and write the run folder ``out``; returns (checkpoint, metrics).

    A folder holding a finished or interrupted run is refused unless ``force``. The folder gets
    ``resume.pt`` after every epoch and stage (see :func:`resume_run`), replaced by
    ``checkpoint.pt`` when the cascade finishes. With ``dist`` (torchrun), rank 0 writes.
    """
    out = Path(out)
    if dist.main:
        check_run_folder(out, force)
    dist.barrier()  # no rank starts writing before every rank checked the folder
    return _train(cfg, Path(data), out, log, progress, dist, None)


def resume_run(
    run: str | Path, log: Log = print, progress: bool = True, *, dist: Dist = SINGLE
) -> tuple[Path, dict]:
    """Continue the interrupted run in folder ``run`` from its last ``resume.pt`` (same config,
    same dataset — checked by content fingerprint); the result is bit-identical to an
    uninterrupted run with the same thread count."""
    run = Path(run)
    raw = _load_resume(run)
    cfg = RunConfig.from_dict(raw["train_config"])
    data = Path(raw["dataset"])
    now = dataset_fingerprint(dataset_files(data)) if data.is_dir() else "missing"
    if now != raw["dataset_fingerprint"]:
        raise RunFolderError(
            f"cannot resume {run}: dataset {data} changed since the run started "
            f"(fingerprint {now}, the run trained on {raw['dataset_fingerprint']})"
        )
    return _train(cfg, data, run, log, progress, dist, raw)


def warm_run(
    prev: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: RunConfig | None = None,
    log: Log = print,
    progress: bool = True,
    *,
    force: bool = False,
) -> tuple[Path, dict]:
    """Continue the finished run ``prev`` on the dataset ``data`` into the new run folder ``out``
    (trainer/warm.py); ``cfg``: a --config for the same features (default: the run's own).
    ``prev`` is only read: a failure leaves it, and anything built from it, as it was."""
    prev, data, out = Path(prev), Path(data), Path(out)
    if out.resolve() == prev.resolve():
        raise RunFolderError(
            f"--out {out} is the --from run: a warm start writes a new run folder and leaves the "
            "previous one intact"
        )
    ckpt = load_checkpoint(prev)
    cfg = warm_config(ckpt, cfg)
    if cfg.train.data == "stream":
        raise ConfigError("a warm start reads its dataset in memory: set train.data = 'memory'")
    check_run_folder(out, force)
    start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    spec = cfg.features
    ds = load_dataset(data, spec, objectives=())
    user_vocab, item_vocab, grown = grow_vocabs(ckpt, ds, spec.user, spec.item)
    absent_users = with_absent_rows(ds.users, spec.user.id_column, user_vocab)[1]
    absent_items = with_absent_rows(ds.items, spec.item.id_column, item_vocab)[1]
    split = split_by_time(ds.events, **asdict(cfg.split))
    enc = encode_dataset(ds, spec, split, (user_vocab, item_vocab))
    since = ckpt.metrics.get("trained_through")
    if since is None:
        log(f"warning: {prev} does not record what it trained through; fine-tuning on every event")
    positives = new_positives(enc, cfg, since)
    if not any(positives.values()):
        raise DataError(
            f"{data}: no train-split events after {since} (what {prev} trained through): "
            "nothing new to learn from"
        )
    log(
        f"warm start from {prev}: {data}: {enc.n_users:,} users (+{grown['user.id']:,}), "
        f"{enc.n_items:,} items (+{grown['item.id']:,}); new positives "
        + ", ".join(f"{o} {n:,}" for o, n in positives.items())
    )
    torch.manual_seed(cfg.train.seed)  # the grown rows' initial values
    model = grow_model(ckpt, user_vocab, item_vocab)
    model.use_sparse_gradients(cfg.train.id_tables == "row-wise")
    model.train()
    old_rows = {n: t.shape[0] for n, t in ckpt.state_dict.items() if t.dim() == 2}
    carried = moments.load(prev) if cfg.warm.moments == "carry" else None
    if carried == {}:
        log(f"{prev} kept no optimizer moments ({moments.MOMENTS_NAME}): every stage starts fresh")
    metrics = run_warm(model, enc, cfg, since, log, progress, old_rows, carried)
    kept = metrics.pop("moments")  # tensors: the run folder's moments.pt, never its metrics
    metrics["seconds"] = time.perf_counter() - start
    metrics["output_slices"] = output_slices(model)
    metrics["trained_through"] = trained_through(enc, since)
    metrics["warm_start"] = {
        "from": str(prev.resolve()),
        "since": since,
        "grown_rows": grown,
        "absent_from_tables": {"users": absent_users, "items": absent_items},
        "new_positives": positives,
    }
    new = run_checkpoint(cfg, data, model, user_vocab, item_vocab, metrics, ckpt.model_config)
    return write_run(out, new, kept if cfg.train.save_moments else None), metrics


def run_checkpoint(
    cfg: RunConfig,
    data: Path,
    model: torch.nn.Module,
    user_vocab: TowerVocab,
    item_vocab: TowerVocab,
    metrics: dict,
    model_config: ModelConfig | None = None,
) -> Checkpoint:
    """What a finished training run (from scratch, warm-started or extended) saves: ``model``'s
    state with ``cfg`` and its vocabularies, ``metrics``, and ``data``'s provenance.
    ``model_config``: the model's own (default ``cfg.model``)."""
    return Checkpoint(
        model_config=model_config or cfg.model,
        features=cfg.features,
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        objectives=cfg.objectives,
        state_dict=model.state_dict(),
        dataset=str(data.resolve()),
        train_config=cfg.to_dict(),
        metrics=metrics,
        provenance=training_provenance(data, user_vocab, item_vocab),
    )


def write_run(out: Path, ckpt: Checkpoint, kept: moments.Moments | None = None) -> Path:
    """A finished run folder: ``checkpoint.pt`` (atomically), ``train_metrics.json`` and, if
    ``kept``, the stages' optimizer moments (``moments.pt``, before the checkpoint: a folder
    with a checkpoint is finished)."""
    if kept:
        moments.save(kept, out)
    path = save_checkpoint(ckpt, out / CHECKPOINT_NAME)
    write_json(out / TRAIN_METRICS, {"config": ckpt.train_config, **ckpt.metrics})
    return path


def resume_config(run: str | Path) -> RunConfig:
    """The config of the interrupted run in folder ``run``."""
    return RunConfig.from_dict(_load_resume(Path(run))["train_config"])


def _load_resume(run: Path) -> dict:
    path = run / RESUME_NAME
    if not path.exists():
        if (run / CHECKPOINT_NAME).exists():
            raise RunFolderError(
                f"run {run} already finished ({CHECKPOINT_NAME}); nothing to resume"
            )
        raise RunFolderError(f"no interrupted run to resume in {run} (no {RESUME_NAME})")
    return load_versioned(path, RESUME_FORMAT, RunFolderError)


def _train(
    cfg: RunConfig, data: Path, out: Path, log: Log, progress: bool, dist: Dist, raw: dict | None
) -> tuple[Path, dict]:
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    streamed = use_stream(cfg, data)
    t_prepare = time.perf_counter()
    enc = prepare(cfg, data, stream=streamed, dist=dist).to(device)
    if streamed:  # again: arrow frees other threads' blocks lazily
        from trainer.data.stream import return_freed_memory

        return_freed_memory()
    prepare_seconds = time.perf_counter() - t_prepare
    n_train, n_val, n_test = enc.split_sizes()
    log(
        f"data {data}: {enc.n_users:,} users, {enc.n_items:,} items, "
        f"{n_train:,}/{n_val:,}/{n_test:,} train/val/test events; device {device}"
        + ("; streamed from Parquet" if streamed else "")
        + (f"; {dist.world} processes" if dist.active else "")
    )
    model = new_model(cfg.model, cfg.features, enc.user_vocab, enc.item_vocab).to(device)
    model.use_sparse_gradients(cfg.train.id_tables == "row-wise")
    # torch's first optimizer imports torch._dynamo (~1 s): pay it here, not in stage 0's steps
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    fingerprint = dataset_fingerprint(dataset_files(data))
    resume = None
    if raw is not None:
        model.load_state_dict(raw["state_dict"])
        model.sync_owners()
        model.check_owners()
        resume = _progress_from(raw["progress"])
        log(f"resuming {out}: stage {resume.stage}, {resume.phase.value}, epoch {resume.epoch}")
        if raw.get("processes", 1) != dist.world:
            log(
                f"warning: the run was started with {raw.get('processes', 1)} process(es), resumed "
                f"with {dist.world}: the global batch and negative sampling change from here on "
                "(valid, but not bit-identical to an uninterrupted run)"
            )

    def save_progress(p: Progress) -> None:
        if dist.main:
            payload = {
                "format": RESUME_FORMAT,
                "train_config": cfg.to_dict(),
                "dataset": str(data.resolve()),
                "dataset_fingerprint": fingerprint,
                "processes": dist.world,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "progress": _progress_to(p),
            }
            atomic_save(payload, out / RESUME_NAME)

    kept: moments.Moments | None = {} if cfg.train.save_moments and dist.main else None
    metrics = run_cascade(
        model, enc, cfg, log=log, progress=progress, resume=resume, on_checkpoint=save_progress,
        dist=dist, moments=kept,
    )  # fmt: skip
    metrics["seconds"] = time.perf_counter() - start
    metrics["device"] = str(device)
    metrics["data"] = "stream" if streamed else "memory"
    metrics["prepare_seconds"] = prepare_seconds  # load/validate/split/encode (or the passes)
    metrics["processes"] = dist.world
    metrics["peak_rss_mb"] = dist.gather_objects(_peak_rss_mb())  # per rank
    metrics["id_tables"] = _table_sizes(model, cfg)
    metrics["trained_through"] = trained_through(enc)  # a warm start continues after it
    if dist.active:  # payload bytes of this rank's gradient collectives, per step
        steps = max(dist.traffic["steps"], 1)
        metrics["traffic_bytes_per_step"] = {
            k: dist.traffic[k] / steps for k in ("dense", "tables")
        }
    if resume is not None:
        metrics["resumed_from"] = {
            "stage": resume.stage, "phase": resume.phase.value, "epoch": resume.epoch
        }  # fmt: skip
    ckpt = run_checkpoint(cfg, data, model, enc.user_vocab, enc.item_vocab, metrics)
    path = out / CHECKPOINT_NAME
    if dist.main:
        write_run(out, ckpt, kept)
        (out / RESUME_NAME).unlink(missing_ok=True)  # the run is finished
    dist.barrier()
    return path, metrics


def _table_sizes(model, cfg: RunConfig) -> dict:
    """Bytes of the id tables and of their optimizer state (SparseAdam or Adam: two moments per
    entry), for the benchmark's 'RSS minus what the model must hold'."""
    from csmf.towers import OwnedEmbedding

    tables = sum(m.weight.nbytes for m in model.modules() if isinstance(m, OwnedEmbedding))
    return {"mode": cfg.train.id_tables, "table_bytes": tables, "optimizer_state_bytes": 2 * tables}


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _progress_to(p: Progress) -> dict:
    """Progress → plain tensors/str/numbers (loadable with weights_only=True)."""
    return {
        "stage": p.stage,
        "phase": p.phase.value,
        "epoch": p.epoch,
        "stages": json.dumps(p.stages, default=float),
        "rec": json.dumps(p.rec, default=float),
        "probe": [torch.as_tensor(p.probe[0]), torch.as_tensor(p.probe[1])],
        "frozen_scores": [s.detach().cpu() for s in p.frozen_scores],
        "rng": json.dumps(p.rng),
        "sample_rngs": [json.dumps(s) for s in p.sample_rngs],
        "gen": p.gen,
        "torch_rng": p.torch_rng,
        "opt_state": p.opt_state,
        "subset": None if p.subset is None else torch.as_tensor(p.subset),
        "seconds": p.seconds,
    }


def _progress_from(d: dict) -> Progress:
    return Progress(
        stage=d["stage"],
        phase=Phase(d["phase"]),
        epoch=d["epoch"],
        stages=json.loads(d["stages"]),
        rec=json.loads(d["rec"]),
        probe=(d["probe"][0].numpy(), d["probe"][1].numpy()),
        frozen_scores=list(d["frozen_scores"]),
        rng=json.loads(d["rng"]),
        sample_rngs=[json.loads(s) for s in d["sample_rngs"]],
        gen=d["gen"],
        torch_rng=d["torch_rng"],
        opt_state=d["opt_state"],
        subset=None if d["subset"] is None else d["subset"].numpy(),
        seconds=d["seconds"],
    )


def eval_run(
    run: str | Path, weights: str | None = None, n: int | None = None, write: bool = True
) -> dict:
    """Evaluate a run folder on its dataset's test split; writes ``eval.json`` into the run."""
    ckpt = load_checkpoint(run)
    cfg = RunConfig.from_dict(ckpt.train_config)
    k = parse_weights(_floats(weights), ckpt.objectives) if weights else cfg.eval.weights
    n = n or cfg.eval.n
    enc = prepare(cfg, ckpt.dataset, vocabs=(ckpt.user_vocab, ckpt.item_vocab))
    # the funnel's labelled objectives (a 2-stage run still reports clicks and conversions) and
    # any objective added to this cascade (csmf extend)
    targets = [*funnel.TARGETS, *(o for o in ckpt.objectives if o not in funnel.NAMES)]
    result = evaluate_model(ckpt.build_model(), enc, ckpt.objectives, k, n, targets=targets)
    result.update(run=str(Path(run)), dataset=ckpt.dataset, objectives=list(ckpt.objectives))
    result["seed"] = cfg.train.seed
    if write:
        write_json(Path(run) / EVAL_NAME, result)
    return result


def _floats(text: str) -> list[float]:
    from csmf.errors import WeightsError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise WeightsError(
            f"--weights expects comma-separated numbers like 1,1.8,1.2, got {text!r}"
        ) from None


def format_table(result: dict) -> str:
    """Rows = rankers, columns = Recall@N / nDCG@N on each target."""
    n = result["n"]
    targets = list(result["metrics"])
    head = ["ranker"] + [f"{t} {m}@{n}" for t in targets for m in ("recall", "ndcg")]
    names = list(next(iter(result["metrics"].values())))
    rows = (
        [
            name,
            *(f"{result['metrics'][t][name][m]:.4f}" for t in targets for m in ("recall", "ndcg")),
        ]
        for name in names
    )
    lines = table(head, rows, "l" + "r" * (len(head) - 1))
    users = ", ".join(f"{t}: {u}" for t, u in result["users"].items())
    lines.append(f"(test users with positives — {users}; weights {result['weights']})")
    return "\n".join(lines)
