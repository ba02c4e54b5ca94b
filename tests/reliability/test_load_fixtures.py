"""The reliability fixtures themselves: ``metrics_dir`` of a worker caught between fork and exec
(test_worker_kill.py once read a just-spawned worker's environment before it held
PROMETHEUS_MULTIPROC_DIR and failed under load) waits for the exec instead of failing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from fixtures.load import metrics_dir


def test_metrics_dir_waits_for_a_worker_that_has_not_exec_d_yet(tmp_path):
    if b"PROMETHEUS_MULTIPROC_DIR=" in Path("/proc/self/environ").read_bytes():
        pytest.skip("this test process was started with PROMETHEUS_MULTIPROC_DIR set")
    pid = os.fork()
    if pid == 0:  # the child: still the parent's image (and environment) for 0.3 s
        try:
            time.sleep(0.3)
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
            os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(2)"], env)
        finally:
            os._exit(1)
    try:
        t0 = time.monotonic()
        assert metrics_dir(pid) == tmp_path
        assert time.monotonic() - t0 >= 0.2  # it really waited for the exec
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
