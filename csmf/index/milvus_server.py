"""A real Milvus Standalone server on this machine without Docker, for tests, benchmarks and
development (docs/design.md#the-index-seam).

The registry's ``milvus`` package (the ``milvus-server`` extra, pinned to 2.3.5) ships the
Milvus 2.3 standalone binary with etcd and local storage embedded. Its Python wrapper picks free
ports silently and waits on ``/healthz``; this module uses only its binaries and config
template, and runs the binary itself:

* every port is explicit, and a busy one is an error naming it (the wrapper would silently move
  to another port); the embedded etcd always listens on 2379/2380, so one server per machine —
  :data:`LOCK` (a file lock) says who owns it;
* ``common.gracefulStopTimeout`` is low, so SIGTERM stops it in seconds (the default 1800 s can
  hang a test session's teardown);
* ready means a search succeeds on a probe collection, not ``/healthz``: after a restart the
  health check answers OK tens of seconds before the query node serves the loaded collections.

Run one in the foreground, or wait for any Milvus (compose, a cluster) to answer a search::

    python -m csmf.index.milvus_server --dir .cache/milvus-server --port 19530
    python -m csmf.index.milvus_server --wait http://127.0.0.1:19530
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from csmf.errors import ConfigError

PACKAGE = "milvus==2.3.5"
LOCK = Path("/tmp/csmf-milvus-server.lock")  # the machine's one embedded-etcd server
ETCD_PORTS = (2379, 2380)  # fixed by the embedded etcd, whatever the config says
# Internal ports of the standalone's components, given explicitly so none moves silently
INTERNAL_PORTS = {
    "etcd_port": 2379,
    "root_coord_port": 53100,
    "proxy_internal_port": 19529,
    "query_coord_port": 19531,
    "query_node_port": 21123,
    "index_coord_port": 22930,
    "index_node_port": 21121,
    "data_coord_port": 13333,
    "data_node_port": 21124,
}
PROBE = "csmf_probe"  # a one-row collection: ready = a search on it succeeds
GRACEFUL_STOP_S = 3
# etcd lease of a component's session (Milvus's default): a restart after a kill waits for the
# dead one's to expire. 10 s restarted faster, but a 1M-item index build at load average 35
# missed keep-alives for that long and the query coordinator shut itself down.
SESSION_TTL_S = 30


class MilvusServer:
    """One ``milvus run standalone`` process: binaries under ``bin_dir`` (unpacked once from the
    ``milvus`` package), data, config and logs under ``data_dir`` (kept across restarts)."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 19530,
        metrics_port: int = 9091,
        bin_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.bin_dir = Path(bin_dir).resolve() if bin_dir else self.data_dir / "bin"
        clash = {port, metrics_port} & {*INTERNAL_PORTS.values(), *ETCD_PORTS}
        if clash or port == metrics_port:
            raise ConfigError(
                f"Milvus port {port} / metrics port {metrics_port} must differ from each other "
                f"and from the server's internal ports {sorted({*INTERNAL_PORTS.values(), *ETCD_PORTS})}"
            )
        self.port = port
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen | None = None
        self._log: object = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "milvus-stdout.log"

    # -- lifecycle --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Unpack the binaries (once: ~20 s, checked by md5 after) and write the config."""
        try:
            import milvus as package
        except ImportError as exc:
            raise ConfigError(
                f"a local Milvus server needs the `milvus` package ({PACKAGE}): "
                "pip install 'csmf-retrieval[milvus-server]'"
            ) from exc
        if self.bin_dir.name != "bin":  # the package unpacks into <folder>/bin
            raise ConfigError(f"bin_dir must be a folder named bin, got {self.bin_dir}")
        self.bin_dir.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.bin_dir.parent / ".unpack.lock"):
            package._initialize_data_files(str(self.bin_dir.parent))
        config = package.MilvusServerConfig(data_dir=str(self.data_dir))
        for key, port in {"proxy_port": self.port, **INTERNAL_PORTS}.items():
            config.set(key, port)  # not config.resolve(): it moves a busy port elsewhere
        config.resolve_storage()
        config.set("common.gracefulStopTimeout", GRACEFUL_STOP_S)
        config.set("common.session.ttl", SESSION_TTL_S)
        config.write_config()

    def start(self) -> None:
        """Start the process (not waiting: :meth:`wait_ready`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"Milvus server already running (pid {self.proc.pid})")
        ports = {self.port, self.metrics_port, *ETCD_PORTS, *INTERNAL_PORTS.values()}
        busy = sorted(p for p in ports if _in_use(p))
        if busy:
            raise ConfigError(
                f"cannot start Milvus on port {self.port}: port(s) {busy} already in use "
                "(another Milvus server? its embedded etcd always takes 2379/2380)"
            )
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.metrics_port),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": f"{self.bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop/kill)
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "milvus"), "run", "standalone"],
            cwd=self.data_dir,  # the binary reads ./configs/milvus.yaml
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the parent's terminal does not reach it
        )

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Block until a search succeeds (creating the probe collection on a fresh server);
        returns the seconds waited. Raises with the log's tail if the process dies."""
        t0 = time.monotonic()
        last: object = None
        with _quiet("pymilvus"):  # it logs a traceback for every refused attempt
            while time.monotonic() - t0 < timeout:
                last = self._try_ready()
                if last is None:
                    return time.monotonic() - t0
                time.sleep(0.5)
        raise TimeoutError(f"Milvus at {self.uri} not ready after {timeout:g} s: {last}")

    def _try_ready(self) -> Exception | None:
        from pymilvus import MilvusClient

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Milvus server exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            client = MilvusClient(uri=self.uri, timeout=3)
            try:
                _probe(client)
            finally:
                client.close()
        except Exception as exc:  # refused, not loaded yet, coordinator not up yet
            return exc
        return None

    def stop(self, timeout: float = GRACEFUL_STOP_S + 10) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._closed()

    def kill(self) -> None:
        """SIGKILL by pid: no graceful stop (what a crash or an OOM kill looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._closed()

    def _closed(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _probe(client) -> None:
    """One search on the probe collection (created, filled and loaded on a fresh server)."""
    from pymilvus import DataType, MilvusClient

    if not client.has_collection(PROBE):
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        ip = client.prepare_index_params()
        ip.add_index(field_name="vector", index_type="FLAT", metric_type="IP", params={})
        client.create_collection(PROBE, schema=schema, index_params=ip)
        client.insert(PROBE, [{"row": 0, "vector": np.ones(2, np.float32)}])
        client.flush(PROBE)
    client.load_collection(PROBE)
    hits = client.search(
        PROBE, data=[np.ones(2, np.float32)], limit=1, consistency_level="Strong", timeout=3
    )
    if len(hits[0]) != 1:
        raise RuntimeError("probe search returned no hit")


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def machine_slot(blocking: bool = False) -> Iterator[bool]:
    """Hold :data:`LOCK` (the machine's one Milvus server slot) for the block; yields whether it
    was had (``blocking=False`` does not wait for another holder)."""
    with open(LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wait_for(uri: str, timeout: float = 300.0) -> float:
    """Block until a search succeeds on the Milvus at ``uri`` (any server: compose, a cluster);
    returns the seconds waited."""
    from pymilvus import MilvusClient

    t0 = time.monotonic()
    last: object = None
    with _quiet("pymilvus"):
        while time.monotonic() - t0 < timeout:
            try:
                client = MilvusClient(uri=uri, timeout=3)
                try:
                    _probe(client)
                    return time.monotonic() - t0
                finally:
                    client.close()
            except Exception as exc:
                last = exc
            time.sleep(1.0)
    raise TimeoutError(f"Milvus at {uri} not ready after {timeout:g} s: {last}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run a local Milvus Standalone (no Docker) until ^C")
    p.add_argument("--dir", type=Path, default=Path(".cache/milvus-server"), help="data folder")
    p.add_argument("--port", type=int, default=19530)
    p.add_argument("--metrics-port", type=int, default=9091)
    p.add_argument(
        "--wait", metavar="URI", help="start nothing: wait until a search succeeds at URI, exit"
    )
    a = p.parse_args(argv)
    if a.wait:
        print(f"Milvus at {a.wait} ready after {wait_for(a.wait):.1f} s")
        return
    with machine_slot() as had:
        if not had:
            raise SystemExit(f"another Milvus server holds {LOCK}: one per machine")
        server = MilvusServer(a.dir, a.port, a.metrics_port)
        server.prepare()
        server.start()
        try:
            waited = server.wait_ready()
            print(
                f"Milvus 2.3 ready at {server.uri} after {waited:.1f} s (logs: {server.log_path})"
            )
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


if __name__ == "__main__":
    main()
