"""``csmf data``: build datasets in the csmf format (docs/design.md#data-formats). Never imports
torch.

Run standalone as ``python -m trainer.data.cli``; the top-level ``csmf`` command mounts ``app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from csmf.cli import config_options, fail, new_app
from csmf.errors import CsmfError
from csmf.out_folder import check_out
from csmf.progress import progress_bar
from trainer.data.synthetic import SyntheticConfig

app = new_app(
    help="Build datasets in the csmf format: real MovieLens-100K, or a synthetic cascade "
    "(exposure → click → conversion) with known ground truth.",
    no_args_is_help=True,
)


def _summary(name: str, out: Path, counts: dict[str, int]) -> str:
    parts = [f"{counts[k]:,} {k}" for k in ("users", "items", "exposures", "clicks")]
    parts.append(f"{counts['conversions']:,} conversions")
    if counts.get("candidates"):
        parts.append(f"{counts['candidates']:,} candidates")
    return f"wrote {name} to {out}: " + ", ".join(parts)


Force = Annotated[
    bool,
    typer.Option(
        "--force", help="Write into an --out folder that holds something other than a dataset."
    ),
]


@app.command("ml-100k")
def ml_100k(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (created).")],
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Where the recbole wheel and the extracted raw files are kept "
            "[default: $CSMF_CACHE_DIR or ~/.cache/csmf].",
        ),
    ] = None,
    force: Force = False,
) -> None:
    """MovieLens-100K from the recbole==1.2.1 wheel (exposure = rated, click = rating >= 4, conversion = rating == 5)."""
    from trainer.data.movielens import convert_ml100k, fetch_ml100k

    try:
        check_out(out, "dataset", force)
        if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
            raise CsmfError(f"--cache-dir {cache_dir} is a file, not a folder")
        src = fetch_ml100k(cache_dir, log=lambda msg: typer.echo(msg, err=True))
        counts = convert_ml100k(src, out)
    except CsmfError as exc:
        fail(exc)
    typer.echo(_summary("ml-100k", out, counts))


@app.command("synthetic")
@config_options(SyntheticConfig)
def synthetic(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (created).")],
    force: Force = False,
    *,
    config: SyntheticConfig,
) -> None:
    """Seeded synthetic cascade with ground truth (truth.npz); streams events in chunks. Every
    option but --out is a field of trainer.data.synthetic.SyntheticConfig."""
    from trainer.data.synthetic import generate_synthetic

    try:
        check_out(out, "dataset", force)
        with progress_bar(config.exposures, "synthetic", "ev", unit_scale=True) as bar:
            counts = generate_synthetic(config, out, progress=bar.update)
    except CsmfError as exc:
        fail(exc)
    typer.echo(_summary("synthetic", out, counts))


if __name__ == "__main__":
    app()
