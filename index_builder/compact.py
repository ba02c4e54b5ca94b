"""`csmf index compact`: fold a bundle's item log into a new verified bundle
(docs/design.md#item-writes).

The bundle is loaded and verified, its log replayed, and the live items (deleted rows dropped,
rows renumbered in their current order) become a fresh index with the same build and search
parameters — flat and IVF re-add the vectors (IVF keeps its trained centroids), HNSW builds a new
graph without tombstones. The user and item encoders and the user snapshot are copied; the item
table is rewritten from the live item table; the recall check runs again on the approximate
types against the same floor. The new manifest's ``items_log`` points at the same log with
``applied_seq`` = the last record folded in, so a service that loads it replays only what came
after. Published atomically like a build; then loaded again with checksums and smoke-searched.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from csmf.bundle import (
    ENCODER_FILE,
    ITEM_ENCODER_FILE,
    ITEM_ID_COLUMN,
    ITEMS_FILE,
    USERS_FILE,
    ItemsLog,
    Manifest,
    UserSnapshot,
    load_bundle,
    write_manifest,
)
from csmf.catalogue import Catalogue, log_path
from csmf.errors import BundleError
from csmf.index import IndexSpec
from csmf.index.base import TOMBSTONE_LIMIT
from csmf.index.faiss import FaissIndex
from csmf.onnx_encoder import ONNX_FILE
from index_builder.publish import publish, staging_dir
from index_builder.recall import check_recall, weight_grid

RECALL_USERS = 200
ARROW = {"string": pa.string(), "number": pa.float64(), "bool": pa.bool_()}


def compaction_due(index: Any, spec: IndexSpec) -> bool:
    """HNSW: tombstones above the manifest's ``tombstone_limit`` (default TOMBSTONE_LIMIT)."""
    share = getattr(index, "tombstone_share", lambda: 0.0)()
    limit = spec.tombstone_limit if spec.tombstone_limit is not None else TOMBSTONE_LIMIT
    return share > limit


def compact_bundle(src: str | Path, out: str | Path, progress: bool = False) -> dict[str, Any]:
    """Fold ``src``'s item log into a new bundle at ``out`` (may be ``src`` itself: replaced
    atomically). Returns a summary: items, deleted rows dropped, records folded, seconds."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    bundle = load_bundle(src, verify=True)
    try:
        if not isinstance(bundle.index, FaissIndex):
            raise BundleError(
                f"bundle {src} is served by {bundle.index.capabilities.backend}, whose index "
                "takes writes natively: there is nothing to compact"
            )
        cat = Catalogue(bundle)
        folded = cat.catch_up()
        live = cat.live_rows()
        if len(live) == 0:
            raise BundleError(f"every item of {src} is deleted: a bundle needs at least one")
        fresh = bundle.index.compacted(live, progress)
        m = bundle.manifest
        with staging_dir(out) as stage:
            for name in (ENCODER_FILE, USERS_FILE, ITEM_ENCODER_FILE, ONNX_FILE):
                if (src / name).is_file():
                    shutil.copy2(src / name, stage / name)
            _write_items(stage / ITEMS_FILE, bundle, live)
            recall = m.recall_check
            if not fresh.capabilities.exact and recall is not None:
                vectors = fresh.vectors(np.arange(len(live)))
                users = _query_users(stage, bundle)
                recall = check_recall(
                    fresh, vectors, users, m.slice_sizes, recall.k, recall.floor,
                    weight_grid(len(m.objectives)),
                )  # fmt: skip
            saved = fresh.save(stage)
            if m.index.tombstone_limit is not None:  # the operator's choice carries over
                saved["tombstone_limit"] = m.index.tombstone_limit
            spec = IndexSpec.model_validate({**saved, "tuning": m.index.tuning})
            log = log_path(bundle)
            manifest = Manifest.model_validate(
                {
                    **m.model_dump(exclude={"files"}),
                    "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "item_count": int(len(live)),
                    "index": spec.model_dump(),
                    "recall_check": recall if isinstance(recall, dict) else m.recall_check,
                    "items_log": ItemsLog(
                        file=os.path.relpath(log, out.resolve().parent / out.name),
                        applied_seq=cat.seq,
                        compacted_from=str(src),
                    ).model_dump(),
                    "build": {
                        **m.build,
                        "compaction": {
                            "from": str(src),
                            "records_folded": folded,
                            "applied_seq": cat.seq,
                            "rows_dropped": int(len(bundle.item_ids) - len(live)),
                        },
                    },
                }
            )
            write_manifest(stage, manifest)
            publish(stage, out)
    finally:
        bundle.close()
    check = load_bundle(out, verify=True)  # what the service will do: checksums, dims, tables
    try:
        q = check.encoder.cold_start().reshape(1, -1)
        scores, rows = check.search(q, min(5, len(check.index)))
        if not np.isfinite(scores).all() or (rows < 0).any():
            raise BundleError(f"compacted bundle {out} failed the smoke search: {rows} {scores}")
    finally:
        check.close()
    return {
        "bundle": str(out),
        "items": int(len(live)),
        "rows_dropped": int(len(bundle.item_ids) - len(live)),
        "records_folded": folded,
        "applied_seq": cat.seq,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write_items(path: Path, bundle, live: np.ndarray) -> None:
    data: dict[str, pa.Array] = {
        ITEM_ID_COLUMN: pa.array([str(i) for i in bundle.item_ids[live]], pa.string())
    }
    rows = live.tolist()
    for c, col in bundle.item_meta.items():
        data[c] = pa.array([col[r] for r in rows])
    for a in bundle.manifest.attributes:
        data[a.name] = pa.array(bundle.attributes.values(a.name, live), ARROW[a.type])
    pq.write_table(pa.table(data), path)


def _query_users(stage: Path, bundle) -> np.ndarray:
    enc = bundle.encoder
    snap = UserSnapshot.load(stage / USERS_FILE, enc.spec.id_column)
    if len(snap) == 0:
        return enc.encode([{}], [()])
    pick = np.random.default_rng(0).permutation(len(snap))[:RECALL_USERS]
    got = [snap.get(snap.ids[i]) for i in pick.tolist()]
    return enc.encode([f for f, _ in got], [h for _, h in got])
