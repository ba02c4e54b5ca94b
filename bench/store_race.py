"""Measured: how often an empty Redis restart racing a write loses scenarios.

    .venv/bin/python bench/store_race.py --trials 10            # this checkout's weight store

Per trial: two replicas (``RedisWeightStore``, each with its sync thread, interval 0.25 s — the
service default) share a redis-server this script starts on a free port without persistence.
Replica A writes ``keepme`` and ``keepme2``; both replicas see them; Redis is killed with SIGKILL
and restarted empty; after ``delay`` ms replica B writes ``new``, retrying its 503s as a client
would. After 3 s each replica and a fresh replica (what Redis holds) are compared with the three
acknowledged writes. A trial *loses* if any of them lacks one. Run it in an older checkout
(``git worktree add /tmp/old <commit>``) to measure that store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from csmf.results import script_command, table
from service.errors import StoreUnavailableError
from service.weight_store import RedisWeightStore

OBJ = ("exposure", "click", "conversion")
WANT = {
    "keepme": {"exposure": 1.0, "click": 2.0, "conversion": 3.0},
    "keepme2": {"exposure": 3.0, "click": 2.0, "conversion": 1.0},
    "new": {"exposure": 0.0, "click": 1.0, "conversion": 0.0},
}


class Redis:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="store-race-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _put_retrying(store, name: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while True:
        try:
            store.put(name, WANT[name], "")
            return
        except StoreUnavailableError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def trial(redis: Redis, delay_ms: int, prefix: str) -> list[str]:
    """Names missing anywhere after the race ([] = nothing lost)."""
    a, b = (RedisWeightStore(redis.url, prefix, OBJ, 0.25, 0.3) for _ in range(2))
    a.start(), b.start()
    try:
        assert a.wait_synced(3) and b.wait_synced(3)
        _put_retrying(a, "keepme", 1)
        _put_retrying(a, "keepme2", 1)
        end = time.monotonic() + 2
        while "keepme2" not in b.scenarios and time.monotonic() < end:
            time.sleep(0.01)
        redis.kill()
        redis.start()
        time.sleep(delay_ms / 1000)
        _put_retrying(b, "new", 5)
        time.sleep(3)
        late = RedisWeightStore(redis.url, prefix, OBJ, 0.25, 0.3)
        late.start()
        late.wait_synced(3)
        lost = [
            f"{who}:{n}"
            for who, s in (("A", a), ("B", b), ("Redis", late))
            for n, w in WANT.items()
            if n not in s.scenarios or s.scenarios[n].weights != w
        ]
        late.stop()
        return lost
    finally:
        a.stop(), b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--delays", default="0,50,100,250", help="ms between restart and the PUT")
    args = ap.parse_args()
    redis = Redis()
    redis.start()
    rows = []
    try:
        for delay in map(int, args.delays.split(",")):
            losing = []
            for t in range(args.trials):
                lost = trial(redis, delay, f"race{delay}-{t}:")
                if lost:
                    losing.append(lost)
            rows.append([delay, args.trials, len(losing), ", ".join(losing[0]) if losing else "—"])
            print(f"delay {delay} ms: {len(losing)} of {args.trials} trials lost", flush=True)
    finally:
        redis.stop()
    print(f"`{script_command(__file__)}`\n")  # for bench/results/store-race.md
    head = ["delay ms", "trials", "trials losing a scenario", "example"]
    print("\n".join(table(head, rows, "rrrl")))


if __name__ == "__main__":
    main()
