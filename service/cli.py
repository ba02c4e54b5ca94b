"""``csmf serve``: run the service with uvicorn (mounted by csmf/cli.py as the ``serve`` command).

One worker serves the app object directly. Several workers (``--workers N``) are separate
processes built from ``CSMF_*`` environment variables by ``service.main:app_from_env``; this
command gives them a private runtime folder for Prometheus multiprocess files (so /metrics sums
every worker) and for reload announcements (so a reload in one worker reaches all of them).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from enum import StrEnum
from pathlib import Path

import typer

LogLevel = StrEnum("LogLevel", [(v, v) for v in ("critical", "error", "warning", "info", "debug")])


def serve(
    bundle: Path = typer.Option(
        ...,
        "--bundle",
        help="Bundle folder to serve (from `csmf build-index`), e.g. bundles/ml-100k.",
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 for all."),
    port: int = typer.Option(8000, callback=lambda v: _check_port(v), help="TCP port (1-65535)."),
    workers: int = typer.Option(
        1, min=1, help="Worker processes. Use one per core: a worker serves one request at a time."
    ),
    log_level: LogLevel = typer.Option(LogLevel.info, help="uvicorn log level."),
    access_log: bool = typer.Option(False, help="Log every request (costs ~10% throughput)."),
) -> None:
    """Serve a bundle over HTTP: /v1/retrieve, /v1/retrieve/batch, /admin/*, /healthz, /readyz,
    /metrics. Other settings come from CSMF_* environment variables (see service/settings.py):
    CSMF_ADMIN_TOKEN enables the admin API, CSMF_REDIS_URL shares scenarios between replicas."""
    _check_bindable(host, port)  # usage errors first: before any bundle is read
    # One BLAS thread per process, set before numpy loads: requests are parallel across workers,
    # and OpenBLAS threads on the tower's small matrices spin against each other and against
    # FAISS (measured here: a 500-user batch encode 13–34 ms with 2 BLAS threads, 2–4 ms with 1).
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import uvicorn
    from pydantic import ValidationError

    from csmf.errors import CsmfError
    from service.settings import Settings

    os.environ["CSMF_BUNDLE"] = str(bundle.resolve())
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"error: invalid CSMF_* setting: {exc}", err=True)
        raise typer.Exit(2) from None
    from service.event_log import EventLogError, prepare_folder

    try:  # a clear error now rather than a traceback from inside a worker's startup
        manifest = _preflight(bundle, settings.verify_bundle, settings.encoder)
        if settings.event_log_dir is not None:
            prepare_folder(settings.event_log_dir)
    except (CsmfError, EventLogError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"serving {bundle} (model {manifest.model_version}, {manifest.item_count} items, "
        f"{manifest.index.backend} {manifest.index.type} index) on http://{host}:{port} with {workers} worker(s); "
        f"scenarios: {'redis' if settings.redis_url else settings.scenarios_file}; "
        f"admin: {'on' if settings.admin_token else 'off (set CSMF_ADMIN_TOKEN)'}"
    )
    common = {"host": host, "port": port, "log_level": log_level.value, "access_log": access_log}
    if workers == 1:
        from service.main import create_app

        uvicorn.run(create_app(settings), **common)
        return
    runtime = Path(tempfile.mkdtemp(prefix="csmf-serve-"))
    (runtime / "metrics").mkdir()
    (runtime / "control").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(runtime / "metrics")
    os.environ["CSMF_CONTROL_DIR"] = str(runtime / "control")
    try:
        uvicorn.run("service.main:app_from_env", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"{port} is not a TCP port; expected 1-65535")
    return port


def _check_bindable(host: str, port: int) -> None:
    """A port another process holds (or a host that is not an address here) is a usage error
    (exit 2) now, not uvicorn's exit after the bundle has been loaded. Bound the way uvicorn
    binds (SO_REUSEADDR), so a port in TIME_WAIT is not refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        why = f"cannot resolve {host!r}: {exc.strerror}"
        raise typer.BadParameter(why, param_hint="'--host'") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = "is already in use (another server?); choose another --port"
            else:
                why = f"cannot be bound on {host}: {exc.strerror}"
            raise typer.BadParameter(f"port {port} {why}", param_hint="'--port'") from None


def _preflight(bundle: Path, verify: bool, encoder: str = "numpy"):
    """The manifest, and every file present at its recorded size (free: a stat each) and, with
    CSMF_VERIFY_BUNDLE, its recorded SHA-256 (what each worker checks again when it loads):
    a truncated or corrupted bundle, or one without the file CSMF_ENCODER needs, is one
    ``error:`` line and exit 2, not a worker's traceback."""
    from csmf.bundle import check_encoder, read_manifest, verify_files
    from csmf.errors import BundleError

    manifest = read_manifest(bundle)
    check_encoder(bundle, manifest, encoder)
    if verify:
        verify_files(bundle, manifest)
        return manifest
    for name, rec in manifest.files.items():
        p = bundle / name
        size = p.stat().st_size if p.is_file() else None
        if size != rec.bytes:
            raise BundleError(
                f"file {name} in bundle {bundle} is missing or truncated: "
                f"{size} bytes, manifest says {rec.bytes}"
            )
    return manifest
