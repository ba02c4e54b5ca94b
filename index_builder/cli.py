"""`csmf build-index` and `csmf inspect` (mounted by csmf/cli.py; also `python -m index_builder.cli`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from csmf.cli import config_options, fail, new_app
from csmf.errors import CsmfError
from index_builder.config import BuildConfig

if TYPE_CHECKING:
    from csmf.bundle import Manifest


@config_options(BuildConfig)
def build_index(
    run: Annotated[
        Path, typer.Option(help="Run folder holding checkpoint.pt (from `csmf train`).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Bundle folder to publish (a bundle there is replaced atomically; a folder "
            "holding anything else only with --force; a file never)."
        ),
    ],
    items: Annotated[
        Path | None,
        typer.Option(help="Item table (Parquet/CSV) to index instead of the run's dataset items."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an --out folder that holds something other than a bundle."
        ),
    ] = False,
    *,
    config: BuildConfig,
) -> None:
    """Encode the catalogue, build a FAISS inner-product index, check weighted-query recall and
    publish a verified bundle atomically. First checks that the item table and the dataset are
    the ones the checkpoint was trained on (vocabulary and dataset fingerprint). Every other
    option is a field of index_builder.config.BuildConfig (recorded in the manifest)."""
    from csmf.out_folder import check_out
    from index_builder.build import build_bundle

    try:
        check_out(out, "bundle", force)
        path, m = build_bundle(run, out, config, items=items, progress=not quiet)
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


def export_onnx(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder whose user tower to export.")],
    out: Annotated[
        Path,
        typer.Argument(help="ONNX file to write (a folder: OUT/user_tower.onnx); replaced."),
    ],
) -> None:
    """Write the bundle's user tower (ids, features, history → user vector, the final layer
    permuted like the index) as ONNX: dynamic batch and history length, inputs as
    csmf/onnx_encoder.py describes. The bundle is verified first; the graph is run in
    onnxruntime against the bundle's numpy encoder before the file is written. To serve it, build
    the bundle with `csmf build-index --onnx` (the file then lives in the bundle, checksummed)
    and set CSMF_ENCODER=onnx."""
    from csmf.bundle import ENCODER_FILE, MANIFEST_NAME, read_manifest, verify_files
    from csmf.onnx_encoder import ONNX_FILE
    from csmf.user_encoder import UserEncoder
    from index_builder.onnx_export import export_user_tower

    target = out / ONNX_FILE if out.is_dir() else out
    try:
        m = read_manifest(bundle)
        verify_files(bundle, m)
        if (target.parent / MANIFEST_NAME).exists():
            fail(
                f"{target} is inside the bundle {target.parent}, whose files are checksummed in "
                "its manifest: write elsewhere, or rebuild it with `csmf build-index --onnx`"
            )
        if not target.parent.is_dir():
            fail(f"no folder {target.parent} to write {target.name} into")
        worst = export_user_tower(UserEncoder.load(bundle / ENCODER_FILE), target)
    except CsmfError as exc:
        fail(exc)
    typer.echo(
        f"wrote {target}: the user tower of bundle {bundle} (model {m.model_version}, {m.dim} "
        f"dims), {target.stat().st_size:,} bytes; onnxruntime vs the numpy encoder on the probe: "
        f"max |difference| {worst:.2g}"
    )


export_app = new_app(no_args_is_help=True)


@export_app.callback()
def export() -> None:
    """Export a bundle's user tower for other runtimes (one subcommand per format)."""


export_app.command("onnx")(export_onnx)

app = new_app(help="Index builder: build and inspect bundles.")
app.command("build-index")(build_index)
app.command("inspect")(inspect)

if __name__ == "__main__":
    sys.exit(app())
