"""`csmf build-index` and `csmf inspect` (mounted by csmf/cli.py; also `python -m index_builder.cli`)."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from csmf.cli import fail, new_app
from csmf.errors import CsmfError

if TYPE_CHECKING:
    from csmf.bundle import Manifest


class IndexKind(StrEnum):
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"


class BackendKind(StrEnum):
    faiss = "faiss"
    milvus = "milvus"


class CenterKind(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class HistoryKind(StrEnum):
    train = "train"
    all = "all"


def build_index(
    run: Annotated[
        Path, typer.Option(help="Run folder holding checkpoint.pt (from `csmf train`).")
    ],
    out: Annotated[
        Path, typer.Option(help="Bundle folder to publish (replaced atomically if it exists).")
    ],
    index: Annotated[
        IndexKind,
        typer.Option(
            help="flat = exact; hnsw / ivf = approximate, checked by the recall floor; ivfpq = "
            "compressed codes for catalogues past memory (FAISS only)."
        ),
    ] = IndexKind.ivf,
    backend: Annotated[
        BackendKind,
        typer.Option(help="faiss = index files in the bundle; milvus = a collection at --uri."),
    ] = BackendKind.faiss,
    uri: Annotated[
        str | None,
        typer.Option(help="Milvus URI: a Milvus Lite file (*.db) or http://host:19530."),
    ] = None,
    collection: Annotated[
        str, typer.Option(help="Milvus alias, moved to the new versioned collection on publish.")
    ] = "csmf_items",
    pq_m: Annotated[
        int | None, typer.Option(help="ivfpq: sub-quantizers = code bytes (default dim/4).")
    ] = None,
    pq_bits: Annotated[int | None, typer.Option(help="ivfpq: bits per code (default 8).")] = None,
    opq: Annotated[bool, typer.Option("--opq", help="ivfpq: learn an OPQ rotation.")] = False,
    rerank: Annotated[
        int,
        typer.Option(
            help="ivfpq: re-rank rerank·k candidates with exact on-disk vectors (0 = off)."
        ),
    ] = 0,
    filter_columns: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated item columns filterable at serving ('' = none; default: every "
            "categorical/numeric item feature)."
        ),
    ] = None,
    hnsw_m: Annotated[int, typer.Option(help="HNSW graph degree M.")] = 32,
    ef_construction: Annotated[
        int, typer.Option(help="HNSW efConstruction (build quality).")
    ] = 200,
    ef_search: Annotated[int, typer.Option(help="HNSW efSearch used at serving.")] = 128,
    nlist: Annotated[
        int | None,
        typer.Option(help="IVF lists (default ~4·sqrt(items), capped for small catalogues)."),
    ] = None,
    nprobe: Annotated[int, typer.Option(help="IVF lists probed at serving.")] = 32,
    center: Annotated[
        CenterKind,
        typer.Option(
            help="Store item vectors minus their mean (rankings and returned scores unchanged); "
            "auto = for hnsw, whose inner-product graph degrades when items share an offset."
        ),
    ] = CenterKind.auto,
    items: Annotated[
        Path | None,
        typer.Option(help="Item table (Parquet/CSV) to index instead of the run's dataset items."),
    ] = None,
    recall_floor: Annotated[
        float, typer.Option(help="Fail unless ANN recall@k >= this under every weighting.")
    ] = 0.95,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="Lower --nprobe / --ef-search to the smallest value whose weighted recall on a "
            "separate sample of users reaches the floor + --tune-margin (faster serving).",
        ),
    ] = False,
    tune_margin: Annotated[float, typer.Option(help="Recall headroom when tuning.")] = 0.01,
    recall_k: Annotated[int, typer.Option(help="k of the ANN-vs-exact recall check.")] = 50,
    recall_queries: Annotated[
        int, typer.Option(help="Snapshot users encoded as recall-check queries.")
    ] = 1000,
    batch_size: Annotated[int, typer.Option(help="Items per encoding batch.")] = 4096,
    history: Annotated[
        HistoryKind,
        typer.Option(
            help="Snapshot history per user: the run's train split (what evaluation used) or all events."
        ),
    ] = HistoryKind.train,
    threads: Annotated[int, typer.Option(help="FAISS/torch threads (0 = all cores).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for k-means and query sampling.")] = 0,
    allow_unknown_items: Annotated[
        bool,
        typer.Option(
            "--allow-unknown-items",
            help="Index item ids the checkpoint was not trained on as cold items (features only, "
            "the unknown-id embedding). Without it such items are an error naming their count.",
        ),
    ] = False,
    allow_dataset_change: Annotated[
        bool,
        typer.Option(
            "--allow-dataset-change",
            help="Build although the run's dataset folder no longer has the content fingerprint "
            "recorded at training (replaced or modified). Without it that is an error.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Encode the catalogue, build a FAISS inner-product index, check weighted-query recall and
    publish a verified bundle atomically. First checks that the item table and the dataset are
    the ones the checkpoint was trained on (vocabulary and dataset fingerprint)."""
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    try:
        cfg = BuildConfig(
            index=index.value,
            backend=backend.value,
            uri=uri,
            collection=collection,
            pq_m=pq_m,
            pq_bits=pq_bits,
            opq=opq,
            rerank=rerank,
            filter_columns=None
            if filter_columns is None
            else tuple(c.strip() for c in filter_columns.split(",") if c.strip()),
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            ef_search=ef_search,
            nlist=nlist,
            nprobe=nprobe,
            center=center.value,
            recall_floor=recall_floor,
            tune=tune,
            tune_margin=tune_margin,
            recall_k=recall_k,
            recall_queries=recall_queries,
            batch_size=batch_size,
            history=history.value,
            threads=threads,
            seed=seed,
            allow_unknown_items=allow_unknown_items,
            allow_dataset_change=allow_dataset_change,
        )
        path, m = build_bundle(run, out, cfg, items=items, progress=not quiet)
    except CsmfError as exc:
        fail(exc)
    for warning in m.source.get("provenance", {}).get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    rc = m.recall_check
    typer.echo(
        f"bundle {path}: {m.item_count} items, {m.user_count} users, {m.index.backend} "
        f"{m.index.type} {m.index.search_params}, recall@{rc.k} min {rc.min_recall:.4f} "
        f"(floor {rc.floor}), model {m.model_version}, {m.build['seconds']:.1f}s"
    )


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    quick: Annotated[
        bool, typer.Option("--quick", help="Check manifest and checksums only; skip loading.")
    ] = False,
) -> None:
    """Print a bundle's manifest summary and verify it: checksums, format version and dimensions.
    Exit 0 if valid, 2 with the reason otherwise."""
    from csmf.bundle import load_bundle, read_manifest, verify_files

    try:
        m = read_manifest(bundle)
        typer.echo(summarize(m))
        verify_files(bundle, m)
        if not quick:
            load_bundle(bundle, verify=False).close()  # just verified; now dims, index, tables
    except CsmfError as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"OK: {len(m.files)} files verified" + ("" if quick else ", bundle loads"))


def summarize(m: Manifest) -> str:
    idx, rc = m.index, m.recall_check
    where = f"{idx.uri} collection={idx.collection_version}" if idx.uri else "in bundle"
    lines = [
        f"format          {m.format}",
        f"model_version   {m.model_version}",
        f"created_at      {m.created_at or '?'}",
        f"objectives      {list(m.objectives)}",
        f"slice_sizes     {list(m.slice_sizes)} (dim {m.dim})",
        f"items           {m.item_count}",
        f"users           {m.user_count}",
        f"index           {idx.backend} {idx.type} build={idx.build_params} "
        f"search={idx.search_params} bytes={idx.bytes} centred={idx.item_offset is not None} "
        f"({where})",
        f"filterable      {[f'{a.name}:{a.type}' for a in m.attributes]}",
    ]
    if rc:
        lines.append(
            f"recall@{rc.k}       min {rc.min_recall:.4f} (floor {rc.floor}, {rc.queries} queries)"
        )
        lines += [f"  weights {r.weights}: {r.recall:.4f}" for r in rc.by_weights]
    for name, f in m.files.items():
        lines.append(f"file            {name} {f.bytes} B sha256 {f.sha256[:16]}…")
    return "\n".join(lines)


app = new_app(help="Index builder: build and inspect bundles.")
app.command("build-index")(build_index)
app.command("inspect")(inspect)

if __name__ == "__main__":
    sys.exit(app())
