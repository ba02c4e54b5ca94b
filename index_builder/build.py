"""The build pipeline: checkpoint + items → staging folder → recall check → manifest → publish."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import csmf
from csmf.bundle import (
    BUNDLE_FORMAT,
    ENCODER_FILE,
    INDEX_FILE,
    ITEM_ID_COLUMN,
    ITEMS_FILE,
    USERS_FILE,
    UserSnapshot,
    write_manifest,
)
from csmf.checkpoint import Checkpoint, load_checkpoint
from csmf.errors import DataError
from csmf.user_encoder import UserEncoder
from index_builder.config import BuildConfig
from index_builder.encode import (
    encode_items,
    output_permutation,
    read_table,
    user_encoder_from_model,
)
from index_builder.faiss_index import build_faiss_index
from index_builder.publish import publish, staging_dir
from index_builder.recall import check_recall, tune_search_params, weight_grid
from index_builder.snapshot import build_user_snapshot

MAX_SUMMARY_BYTES = 65536  # training config/metrics larger than this are left out of the manifest


def model_version(ckpt: Checkpoint) -> str:
    """Content hash of the model: weights, owners, config, feature spec, vocabularies, cascade."""
    h = hashlib.sha256()
    meta = {
        "model_config": ckpt.model_config.to_dict(),
        "features": ckpt.features.to_dict(),
        "user_vocab": ckpt.user_vocab.to_dict(),
        "item_vocab": ckpt.item_vocab.to_dict(),
        "objectives": list(ckpt.objectives),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(ckpt.state_dict):
        t = ckpt.state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def build_bundle(
    run: str | Path,
    out: str | Path,
    cfg: BuildConfig,
    items: str | Path | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Build and atomically publish the bundle for ``run`` at ``out``; returns (path, manifest).
    Raises (leaving ``out`` untouched) on any failure, including the recall floor."""
    t0 = time.perf_counter()
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
        torch.set_num_threads(cfg.threads)
    run = Path(run)
    ckpt = load_checkpoint(run)
    model = ckpt.build_model()
    feats = ckpt.features
    num_obj = len(ckpt.objectives)
    perm, slice_sizes = output_permutation(model.output_owner.numpy(), num_obj)
    items_path = Path(items) if items else Path(ckpt.dataset) / "items.parquet"
    item_table = read_table(items_path)
    if item_table.num_rows == 0:
        raise DataError(f"item table {items_path} is empty")
    with staging_dir(out) as stage:
        encoder = user_encoder_from_model(
            model.user, feats.user, ckpt.user_vocab, ckpt.item_vocab.ids, perm
        )
        encoder.save(stage / ENCODER_FILE)
        vectors = encode_items(
            model, feats.item, ckpt.item_vocab, item_table, perm, cfg.batch_size, progress
        )
        _write_items(stage / ITEMS_FILE, item_table, feats.item.id_column, feats.display)
        snapshot_info = build_user_snapshot(
            Path(ckpt.dataset),
            feats.user,
            stage / USERS_FILE,
            cfg.history,
            ckpt.train_config.get("split"),
        )
        index, index_info = build_faiss_index(vectors, cfg, progress)
        # Queries are real users encoded the way the service will: snapshot → numpy encoder.
        users, tune_users = _query_users(stage, encoder, cfg)
        if cfg.tune:
            target = min(1.0, cfg.recall_floor + cfg.tune_margin)
            tuning = users if tune_users is None else tune_users
            index_info["search_params"], trace = tune_search_params(
                index,
                cfg.index,
                index_info["search_params"],
                vectors,
                tuning,
                slice_sizes,
                cfg.recall_k,
                target,
                weight_grid(num_obj),
            )
            index_info["tuning"] = {
                "target": target,
                "queries": int(len(tuning)),
                "disjoint_from_check": tune_users is not None,
                "trace": trace,
            }
        recall = check_recall(
            index,
            cfg.index,
            index_info["search_params"],
            vectors,
            users,
            slice_sizes,
            cfg.recall_k,
            cfg.recall_floor,
            weight_grid(num_obj),
        )
        faiss.write_index(index, str(stage / INDEX_FILE))
        index_info["bytes"] = (stage / INDEX_FILE).stat().st_size
        index_info["bytes_per_item"] = round(index_info["bytes"] / len(vectors), 1)
        manifest = {
            "format": BUNDLE_FORMAT,
            "model_version": model_version(ckpt),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "objectives": list(ckpt.objectives),
            "slice_sizes": list(slice_sizes),
            "dim": int(sum(slice_sizes)),
            "output_permutation": perm.tolist(),
            "item_count": int(len(vectors)),
            "user_count": snapshot_info["users"],
            "user_id_column": feats.user.id_column,
            "item_id_column": feats.item.id_column,
            "display_columns": [c for c in feats.display if c in item_table.column_names],
            "index": index_info,
            "recall_check": recall,
            "snapshot": snapshot_info,
            "model": ckpt.model_config.to_dict(),
            "training": _training_summary(ckpt, run),
            "source": {"run": str(run), "items": str(items_path)},
            "build": {
                "config": cfg.to_dict(),
                "seconds": round(time.perf_counter() - t0, 3),
                "csmf_version": csmf.__version__,
                "faiss_version": faiss.__version__,
            },
        }
        manifest = write_manifest(stage, manifest)  # last: a staging folder without it is junk
        publish(stage, out)
    return Path(out), manifest


MIN_TUNE_USERS = 50  # fewer left over: tune on the check sample (recorded in the manifest)


def _write_items(path: Path, table: pa.Table, id_column: str, display: tuple[str, ...]) -> None:
    ids = pc.cast(table.column(id_column), pa.string())
    if ids.null_count:
        raise DataError(f"item table has {ids.null_count} rows without {id_column!r}")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise DataError(
            f"item table has duplicate {id_column!r} values; each item must appear once"
        )
    data = {ITEM_ID_COLUMN: ids}
    data.update({c: table.column(c) for c in display if c in table.column_names and c != id_column})
    pq.write_table(pa.table(data), path)


def _query_users(
    stage: Path, encoder: UserEncoder, cfg: BuildConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """(Q, D) user vectors of a seeded sample of snapshot users for the recall check (cold start
    if there are none), and those of a disjoint sample for tuning — ``None`` when fewer than
    ``MIN_TUNE_USERS`` users are left over (the tuner then uses the check sample)."""
    snap = UserSnapshot.load(stage / USERS_FILE, encoder.spec.id_column)
    if len(snap) == 0:
        return encoder.encode([{}], [()]), None
    order = np.random.default_rng(cfg.seed).permutation(len(snap))
    check = order[: cfg.recall_queries]
    tune = order[cfg.recall_queries : 2 * cfg.recall_queries]

    def encode(rows_: np.ndarray) -> np.ndarray:
        got = [snap.get(snap.ids[i]) for i in rows_.tolist()]
        return encoder.encode([f for f, _ in got], [h for _, h in got])

    return encode(check), encode(tune) if len(tune) >= MIN_TUNE_USERS else None


def _training_summary(ckpt: Checkpoint, run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run": str(run), "dataset": ckpt.dataset}
    for key, value in (("config", ckpt.train_config), ("metrics", ckpt.metrics)):
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            continue
        out[key] = json.loads(text) if len(text) <= MAX_SUMMARY_BYTES else "omitted: too large"
    return out
