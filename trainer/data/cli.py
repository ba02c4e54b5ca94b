"""``csmf data``: build datasets in the csmf format (DESIGN §3). Never imports torch.

Run standalone as ``python -m trainer.data.cli``; the top-level ``csmf`` command mounts ``app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from csmf.cli import fail, new_app
from csmf.errors import CsmfError
from csmf.progress import progress_bar

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
) -> None:
    """MovieLens-100K from the recbole==1.2.1 wheel (exposure = rated, click = rating >= 4, conversion = rating == 5)."""
    from trainer.data.movielens import convert_ml100k, fetch_ml100k

    try:
        src = fetch_ml100k(cache_dir, log=lambda msg: typer.echo(msg, err=True))
        counts = convert_ml100k(src, out)
    except CsmfError as exc:
        fail(exc)
    typer.echo(_summary("ml-100k", out, counts))


@app.command("synthetic")
def synthetic(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (created).")],
    users: Annotated[int, typer.Option("--users", help="Number of users.")],
    items: Annotated[int, typer.Option("--items", help="Number of items (catalogue size).")],
    exposures: Annotated[
        int, typer.Option("--exposures", help="Number of exposure events to generate.")
    ],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same data.")] = 0,
    conflict: Annotated[
        float,
        typer.Option(
            "--conflict",
            help="0 = click/conversion tastes equal exposure taste, 1 = independent of it.",
        ),
    ] = 0.5,
    factors: Annotated[int, typer.Option("--factors", help="Latent dimension K.")] = 16,
    topics: Annotated[
        int, typer.Option("--topics", help="Item topics; 0 = items // 500 within [4, 256].")
    ] = 0,
    exposures_per_request: Annotated[
        int, typer.Option("--exposures-per-request", help="Items exposed per request.")
    ] = 4,
    proposals: Annotated[
        int, typer.Option("--proposals", help="Items proposed per slot; the best is exposed.")
    ] = 8,
    candidates_per_request: Annotated[
        int,
        typer.Option(
            "--candidates-per-request",
            help="Shown-but-not-exposed items kept per request in candidates.parquet (0 = none).",
        ),
    ] = 0,
    ctr: Annotated[float, typer.Option("--ctr", help="Target clicks per exposure.")] = 0.1,
    cvr: Annotated[float, typer.Option("--cvr", help="Target conversions per click.")] = 0.1,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Events per events/part-*.parquet file.")
    ] = 1_000_000,
) -> None:
    """Seeded synthetic cascade with ground truth (truth.npz); streams events in chunks."""
    from trainer.data.synthetic import SyntheticConfig, generate_synthetic

    try:
        cfg = SyntheticConfig(
            users=users,
            items=items,
            exposures=exposures,
            seed=seed,
            conflict=conflict,
            factors=factors,
            topics=topics,
            exposures_per_request=exposures_per_request,
            proposals=proposals,
            candidates_per_request=candidates_per_request,
            ctr=ctr,
            cvr=cvr,
            chunk_size=chunk_size,
        )
        with progress_bar(exposures, "synthetic", "ev", unit_scale=True) as bar:
            counts = generate_synthetic(cfg, out, progress=bar.update)
    except CsmfError as exc:
        fail(exc)
    typer.echo(_summary("synthetic", out, counts))


if __name__ == "__main__":
    app()
