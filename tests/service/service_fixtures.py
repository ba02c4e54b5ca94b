"""Service test fixtures, shared by tests/service and tests/integration: tiny real bundles (flat,
HNSW, IVF) from the index builder's fixture helpers, apps on an embedded store, Redis key prefixes
that are cleaned up, and real processes (`csmf serve`, a test-owned `redis-server`) on free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "index_builder"))

from bundle_fixtures import make_dataset, make_run  # noqa: E402

from index_builder.build import build_bundle  # noqa: E402
from index_builder.config import BuildConfig  # noqa: E402

TOKEN = "test-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
REDIS_URL = os.environ.get("CSMF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Index parameters that make the tiny ANN indexes exact, so exclusions can be compared with
# brute force item for item: IVF probes every list, HNSW's beam holds the whole catalogue.
INDEX_CONFIGS = {
    "flat": BuildConfig(index="flat"),
    "hnsw": BuildConfig(index="hnsw", ef_search=2000, recall_floor=0.0),
    "ivf": BuildConfig(index="ivf", nlist=8, nprobe=8, recall_floor=0.0),
}


@pytest.fixture(scope="session")
def service_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two random-weight runs on one tiny dataset (two model versions, for reload tests)."""
    root = tmp_path_factory.mktemp("service")
    data = make_dataset(root / "data")
    return make_run(root / "run0", data, seed=0), make_run(root / "run1", data, seed=1)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, service_runs) -> dict[str, Path]:
    """{"flat", "hnsw", "ivf"} from run 0 and "other" (flat, run 1: another model version)."""
    root = tmp_path_factory.mktemp("service-bundles")
    out = {}
    for kind, cfg in INDEX_CONFIGS.items():
        out[kind], _ = build_bundle(service_runs[0], root / kind, cfg, progress=False)
    out["other"], _ = build_bundle(
        service_runs[1], root / "other", INDEX_CONFIGS["flat"], progress=False
    )
    return out


@pytest.fixture
def corrupt_bundle(tmp_path, bundles) -> Path:
    """A copy of the flat bundle with bytes flipped in the middle of its index file."""
    bad = tmp_path / "corrupt"
    shutil.copytree(bundles["flat"], bad)
    p = bad / "index.faiss"
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    p.write_bytes(bytes(data))
    return bad


def settings_for(bundle: Path, tmp_path: Path, **kw):
    from service.settings import Settings

    base = {
        "bundle": bundle,
        "admin_token": TOKEN,
        "scenarios_file": tmp_path / "scenarios.json",
        "redis_url": None,
        "sync_interval_s": 0.05,
        "max_batch": 50,
        "max_k": 200,
        "default_k": 10,
    }
    return Settings(_env_file=None, **{**base, **kw})


@pytest.fixture
def make_client(tmp_path):
    """make_client(bundle, **settings) → a started TestClient (lifespan run), closed after."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    clients = []

    def make(bundle: Path, **kw) -> TestClient:
        c = TestClient(create_app(settings_for(bundle, tmp_path, **kw)))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in reversed(clients):
        c.__exit__(None, None, None)


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the shared test Redis, deleted afterwards."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"csmf-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            v = pred()
            if v:
                return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A test-owned redis-server on a free loopback port that tests may stop and restart."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(
            lambda: socket.create_connection(("127.0.0.1", self.port), 0.2), 10, "redis-server"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


# -- `csmf serve` in a subprocess ----------------------------------------------------------------


class ServiceProcess:
    def __init__(self, bundle: Path, tmp: Path, workers: int = 1, **env: str) -> None:
        self.port = free_port()
        self.log = tmp / f"service-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("CSMF_", "PROMETHEUS_"))
        }
        full_env.update(
            {
                "CSMF_ADMIN_TOKEN": TOKEN,
                "CSMF_SCENARIOS_FILE": str(tmp / "scenarios.json"),
                "CSMF_SYNC_INTERVAL_S": "0.1",
                **env,
            }
        )
        args = [sys.executable, "-m", "csmf.cli", "serve", "--bundle", str(bundle)]
        args += ["--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(args, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=10)
        try:
            wait_until(self._ready, 60, f"`csmf serve` on port {self.port}", interval=0.1)
        except AssertionError:
            self.stop()
            raise AssertionError(self.log.read_text()[-3000:]) from None

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"service exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        return self.client.get("/readyz").status_code == 200

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def serve(tmp_path):
    """serve(bundle, workers=1, **env) → a running ServiceProcess, stopped afterwards."""
    procs = []

    def start(bundle: Path, workers: int = 1, **env) -> ServiceProcess:
        sub = tmp_path / f"svc{len(procs)}"
        sub.mkdir()
        p = ServiceProcess(bundle, sub, workers, **env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
