"""The processes a serving benchmark starts and reads: `csmf serve` from a source tree (this one
or a git worktree of another commit), the bench/ comparison servers, readiness, stop, and the
CPU time of a server and its workers from /proc (so the load generator's own CPU is excluded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user+sys) of ``pid`` and of each of its children, by pid."""
    pids = [pid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            continue
    return out


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_service(
    bundle: Path, port: int, workers: int, tmp: Path, code: Path = ROOT, **settings: str
) -> subprocess.Popen:
    """``csmf serve`` from the source tree ``code`` (default: this one; bench/serve.py --before
    passes a git worktree of an earlier commit), which is its working directory and PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CSMF_", "PROMETHEUS_"))}
    env.update({f"CSMF_{k.upper()}": v for k, v in settings.items()})
    env["CSMF_SCENARIOS_FILE"] = str(tmp / f"scenarios-{port}.json")
    env["CSMF_MAX_BATCH"] = "2000"
    env.setdefault("CSMF_VERIFY_BUNDLE", "false")  # checked when built; startup is not measured
    env["PYTHONPATH"] = str(code)
    csmf = [sys.executable, "-m", "csmf.cli", "serve", "--bundle", str(bundle)]
    args = csmf + ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    return subprocess.Popen(
        args, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def start_bare(port: int, workers: int) -> subprocess.Popen:
    args = [sys.executable, "serve_bare.py", str(port), str(workers)]
    return subprocess.Popen(args, cwd=BENCH, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_bench_server(script: str, bundle: Path, port: int, workers: int) -> subprocess.Popen:
    """A bench/ server on ``bundle``: serve_handwritten.py (FastAPI + encoder + FAISS, what a team
    would write instead) or serve_floor.py (bare ASGI + the same work)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, script, str(bundle), str(port), str(workers)]
    return subprocess.Popen(
        args, cwd=BENCH, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def worktree(ref: str, cache: Path) -> tuple[Path, str]:
    """A detached git worktree of ``ref`` (reused if it exists), and its short hash."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = cache / f"code-{sha}"
    if not (path / "service").is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), sha],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return path, sha


def head() -> str:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(  # changes to what is served, not to bench/ or results
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "service", "csmf"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return f"{sha}{' + uncommitted changes' if dirty else ''}" if sha else "this tree"
