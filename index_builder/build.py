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
    ITEM_ENCODER_FILE,
    ITEM_ID_COLUMN,
    ITEMS_FILE,
    USERS_FILE,
    Attribute,
    Manifest,
    UserSnapshot,
    write_manifest,
)
from csmf.checkpoint import Checkpoint, load_checkpoint
from csmf.errors import DataError
from csmf.features import TowerSpec
from csmf.index import IndexSpec, VectorIndex
from csmf.index.faiss import FaissIndex
from csmf.index.filters import column_type
from csmf.onnx_encoder import ONNX_FILE
from csmf.user_encoder import UserEncoder
from index_builder.config import BuildConfig
from index_builder.encode import (
    encode_items,
    output_permutation,
    read_table,
    user_encoder_from_model,
)
from index_builder.onnx_export import export_user_tower
from index_builder.provenance import check_provenance
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


def build_vector_index(
    vectors: np.ndarray, attributes: pa.Table, cfg: BuildConfig, progress: bool = True
) -> VectorIndex:
    """The configured backend's index over (N, D) vectors; row i = item i, with the filterable
    ``attributes`` (N rows) for engines that store them next to the vectors."""
    if cfg.backend == "faiss":
        return FaissIndex.build(vectors, cfg.faiss_spec(), progress)
    from csmf.index.milvus import MilvusIndex  # pymilvus: the `milvus` extra

    return MilvusIndex.build(vectors, attributes, cfg.milvus_spec(), progress)


def build_bundle(
    run: str | Path,
    out: str | Path,
    cfg: BuildConfig,
    items: str | Path | None = None,
    progress: bool = True,
) -> tuple[Path, Manifest]:
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
    provenance = check_provenance(
        ckpt, run, item_table, items_path, cfg.allow_unknown_items, cfg.allow_dataset_change
    )  # DataError when the items or the dataset are not what the run trained on
    with staging_dir(out) as stage:
        encoder = user_encoder_from_model(
            model.user, feats.user, ckpt.user_vocab, ckpt.item_vocab.ids, perm
        )
        encoder.save(stage / ENCODER_FILE)
        if cfg.onnx:  # checked against the numpy encoder before it is written
            export_user_tower(encoder, stage / ONNX_FILE)
        # the item tower too: vectors of items written later, from their features
        user_encoder_from_model(
            model.item, feats.item, ckpt.item_vocab, ckpt.item_vocab.ids, perm
        ).save(stage / ITEM_ENCODER_FILE)
        vectors = encode_items(
            model, feats.item, ckpt.item_vocab, item_table, perm, cfg.batch_size, progress
        )
        attributes = _attributes(item_table, feats.item, cfg.filter_columns)
        display = [c for c in feats.display if c in item_table.column_names]
        _write_items(stage / ITEMS_FILE, item_table, feats.item.id_column, display, attributes)
        snapshot_info = build_user_snapshot(
            Path(ckpt.dataset),
            feats.user,
            stage / USERS_FILE,
            cfg.history,
            ckpt.train_config.get("split"),
        )
        attr_table = pa.table(
            {a.name: _attribute_array(item_table.column(a.name), a.type) for a in attributes}
        )
        index = build_vector_index(vectors, attr_table, cfg, progress)
        try:
            # Queries are real users encoded the way the service will: snapshot → numpy encoder.
            users, tune_users = _query_users(stage, encoder, cfg)
            tuning_info = None
            if cfg.tune:
                target = min(1.0, cfg.recall_floor + cfg.tune_margin)
                tuning = users if tune_users is None else tune_users
                _, trace = tune_search_params(
                    index, vectors, tuning, slice_sizes, cfg.recall_k, target, weight_grid(num_obj)
                )
                tuning_info = {
                    "target": target,
                    "queries": int(len(tuning)),
                    "disjoint_from_check": tune_users is not None,
                    "trace": trace,
                }
            recall = check_recall(
                index,
                vectors,
                users,
                slice_sizes,
                cfg.recall_k,
                cfg.recall_floor,
                weight_grid(num_obj),
            )
            index_spec = IndexSpec.model_validate({**index.save(stage), "tuning": tuning_info})
            index.close()
            recall["bytes_per_item"] = index_spec.bytes_per_item  # what that recall costs in memory
        except BaseException:
            index.discard()  # e.g. the recall floor: no orphan collection in the engine
            raise
        manifest = Manifest(
            format=BUNDLE_FORMAT,
            model_version=model_version(ckpt),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            objectives=tuple(ckpt.objectives),
            slice_sizes=tuple(slice_sizes),
            dim=int(sum(slice_sizes)),
            output_permutation=perm.tolist(),
            item_count=int(len(vectors)),
            user_count=snapshot_info["users"],
            user_id_column=feats.user.id_column,
            item_id_column=feats.item.id_column,
            display_columns=display,
            attributes=attributes,
            index=index_spec,
            recall_check=recall,
            snapshot=snapshot_info,
            model=ckpt.model_config.to_dict(),
            training=_training_summary(ckpt, run),
            source={"run": str(run), "items": str(items_path), "provenance": provenance.summary()},
            build={
                "config": cfg.to_dict(),
                "seconds": round(time.perf_counter() - t0, 3),
                "csmf_version": csmf.__version__,
                "faiss_version": faiss.__version__,
            },
        )
        manifest = write_manifest(stage, manifest)  # last: a staging folder without it is junk
        publish(stage, out)
    if cfg.backend == "milvus":  # the bundle is in place: point the alias at its collection
        from csmf.index.milvus import promote

        promote(index_spec)
    return Path(out), manifest


MIN_TUNE_USERS = 50  # fewer left over: tune on the check sample (recorded in the manifest)


def _attributes(
    table: pa.Table, spec: TowerSpec, columns: tuple[str, ...] | None
) -> list[Attribute]:
    """The filterable columns: ``columns`` as configured (each must be a scalar column of the
    item table), or by default every scalar categorical / numeric item feature the table holds."""
    if columns is None:
        names = [
            f.name
            for f in spec.fields
            if f.kind in ("categorical", "numeric") and f.name in table.column_names
        ]
        names = [n for n in names if column_type(table.schema.field(n).type) is not None]
    else:
        names = list(dict.fromkeys(columns))
        for n in names:
            if n not in table.column_names:
                raise DataError(
                    f"filter column {n!r} is not in the item table (columns: {table.column_names})"
                )
            if column_type(table.schema.field(n).type) is None:
                raise DataError(
                    f"filter column {n!r} has type {table.schema.field(n).type}; filterable "
                    "columns are strings, numbers or booleans"
                )
    bad = [n for n in names if n in (ITEM_ID_COLUMN, spec.id_column) or not n.isidentifier()]
    if bad:
        raise DataError(f"filter columns must be identifiers other than the item id, got {bad}")
    return [Attribute(name=n, type=column_type(table.schema.field(n).type)) for n in names]


def _attribute_array(col: pa.ChunkedArray, kind: str) -> pa.ChunkedArray:
    target = {"string": pa.string(), "number": pa.float64(), "bool": pa.bool_()}[kind]
    return pc.cast(col, target)


def _write_items(
    path: Path,
    table: pa.Table,
    id_column: str,
    display: list[str],
    attributes: list[Attribute],
) -> None:
    ids = pc.cast(table.column(id_column), pa.string())
    if ids.null_count:
        raise DataError(f"item table has {ids.null_count} rows without {id_column!r}")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise DataError(
            f"item table has duplicate {id_column!r} values; each item must appear once"
        )
    data = {ITEM_ID_COLUMN: ids}
    data.update({c: table.column(c) for c in display if c != id_column})
    for a in attributes:  # typed as the filter language reads them
        data[a.name] = _attribute_array(table.column(a.name), a.type)
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
