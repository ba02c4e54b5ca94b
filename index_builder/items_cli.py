"""`csmf index upsert | delete | compact` and `csmf items encode`: item writes from the command
line, through the same item log as the service's admin API (docs/design.md#item-writes). A
running service picks the records up within its sync interval."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from csmf.cli import fail, new_app
from csmf.errors import CsmfError

MAX_BATCH = 10_000  # items per log record from the CLI

File = Annotated[
    Path,
    typer.Argument(
        help="Item rows: Parquet, CSV or JSON lines (.jsonl), with the item table's columns "
        "(id, item-tower features, attributes, display) and optionally `vector`."
    ),
]
Bundle = Annotated[Path, typer.Argument(help="Bundle folder (its item log is beside it).")]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet / CSV / JSON-lines file as dicts."""
    if not path.is_file():
        raise CsmfError(f"no file at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise CsmfError(f"{path} line {n}: not JSON ({exc})") from None
            return rows
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pacsv.read_csv(path) if suffix in (".csv", ".tsv") else pq.read_table(path)
        return table.to_pylist()
    except CsmfError:
        raise
    except Exception as exc:  # pyarrow's several error types for a bad file
        raise CsmfError(f"cannot read {path}: {exc}") from None


def _open(bundle: Path):
    from csmf.bundle import load_bundle
    from csmf.catalogue import Catalogue

    cat = Catalogue(load_bundle(bundle, verify=True))
    cat.catch_up()
    return cat


def _report(errors: dict[str, str], written: int, what: str, seq: int) -> None:
    for key, msg in list(errors.items())[:50]:
        typer.echo(f"error: {key}: {msg}", err=True)
    if len(errors) > 50:
        typer.echo(f"error: ... and {len(errors) - 50} more", err=True)
    typer.echo(f"{what} {written} items (log record {seq}); {len(errors)} rejected")
    if errors:
        raise typer.Exit(2)


def upsert(bundle: Bundle, file: File) -> None:
    """Add or replace items: vectors from `vector` or from their features with the bundle's
    item tower (ids the model never saw take its unknown id row). Each batch is fsynced to the
    item log before this returns; rejected items are listed by id (exit 2)."""
    from csmf.catalogue import check_items

    try:
        cat = _open(bundle)
        rows = read_rows(file)
        written, errors, seq = 0, {}, cat.seq
        for start in range(0, len(rows), MAX_BATCH):
            checked = check_items(cat, rows[start : start + MAX_BATCH], MAX_BATCH)
            errors.update(checked.errors)
            rec = cat.upsert(checked)
            written += len(checked.ids)
            seq = rec.seq if rec else seq
    except (CsmfError, ValueError) as exc:
        fail(exc)
    _report(errors, written, "upserted", seq)


def delete(
    bundle: Bundle,
    file: Annotated[
        Path, typer.Argument(help="Item ids: one per line, or a table with an `item_id` column.")
    ],
) -> None:
    """Delete items by id (idempotent: unknown or already deleted ids are no-ops)."""
    from csmf.catalogue import check_ids

    try:
        cat = _open(bundle)
        if file.suffix.lower() in (".parquet", ".csv", ".jsonl"):
            ids = [r.get("item_id") for r in read_rows(file)]
        else:
            ids = [ln.strip() for ln in file.read_text().splitlines() if ln.strip()]
        written, errors, seq = 0, {}, cat.seq
        for start in range(0, len(ids), MAX_BATCH):
            good, bad = check_ids(ids[start : start + MAX_BATCH], MAX_BATCH)
            errors.update(bad)
            rec = cat.delete(good)
            written += len(good)
            seq = rec.seq if rec else seq
    except (CsmfError, ValueError, OSError) as exc:
        fail(exc)
    _report(errors, written, "deleted", seq)


def compact(
    bundle: Bundle,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to publish the compacted bundle (default: replace BUNDLE)."),
    ] = None,
    if_due: Annotated[
        bool,
        typer.Option("--if-due", help="Only when HNSW tombstones pass index.tombstone_limit."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Fold the item log into a new verified bundle (deleted rows dropped, HNSW rebuilt); then
    `POST /v1/admin/reload` with it swaps it in without a failed request."""
    from index_builder.compact import compact_bundle, compaction_due

    try:
        if if_due:
            cat = _open(bundle)
            if not compaction_due(cat.bundle.index, cat.bundle.manifest.index):
                typer.echo("compaction not due")
                return
        summary = compact_bundle(bundle, out or bundle, progress=not quiet)
    except CsmfError as exc:
        fail(exc)
    typer.echo(json.dumps(summary))


def encode(
    bundle: Bundle,
    file: File,
    out: Annotated[Path, typer.Option(help="Parquet file to write: the id and `vector`.")],
) -> None:
    """Item rows → their vectors with the bundle's item tower (permuted and unscaled like the
    index's; unknown ids at the model's unknown id row). Writes nothing to the catalogue."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from csmf.atomic import atomic_write
    from csmf.bundle import load_bundle
    from csmf.catalogue import Catalogue, check_items

    try:
        cat = Catalogue(load_bundle(bundle, verify=True))
        rows = read_rows(file)
        checked = check_items(cat, rows, max(len(rows), 1))
        for key, msg in list(checked.errors.items())[:50]:
            typer.echo(f"error: {key}: {msg}", err=True)
        vectors = cat.encode(checked)
    except (CsmfError, ValueError) as exc:
        fail(exc)
    table = pa.table(
        {
            "item_id": pa.array(checked.ids, pa.string()),
            "vector": pa.array(vectors.tolist(), pa.list_(pa.float32())),
        }
    )
    atomic_write(out, lambda fh: pq.write_table(table, fh))
    typer.echo(f"encoded {len(checked.ids)} items → {out}; {len(checked.errors)} rejected")
    if checked.errors:
        raise typer.Exit(2)


index_app = new_app(help="Item writes on a bundle: upsert, delete, compact.")
index_app.command("upsert")(upsert)
index_app.command("delete")(delete)
index_app.command("compact")(compact)
items_app = new_app(help="Item rows → vectors with a bundle's item tower.")
items_app.command("encode")(encode)


@items_app.callback()
def _items() -> None:
    """Item rows → vectors with a bundle's item tower."""  # keeps `encode` a subcommand


if __name__ == "__main__":
    sys.exit(index_app())
