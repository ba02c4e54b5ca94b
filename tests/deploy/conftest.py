"""Tool lookups shared by the deploy tests (compose, Prometheus, Grafana, k8s)."""

from __future__ import annotations

import os
import shutil

import pytest

# .ci/run installs Debian's `prometheus` package (prometheus + promtool). A developer machine
# without it skips these tests, saying how to get it; in CI a missing binary is a failure, so the
# alert and dashboard checks can never pass by not running.
APT_HINT = "apt-get install -y prometheus prometheus-pushgateway (what .ci/run does)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"`{name}` is not installed: {APT_HINT}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _tool("prometheus")


@pytest.fixture(scope="session")
def pushgateway_bin() -> str:
    return _tool("prometheus-pushgateway")
