"""The reliability suite's figures report.

Servers, Redis and bundles come from tests/fixtures (real `csmf serve` on loopback, a test-owned
`redis-server` by pid, bundles built by the real index builder), the load generator from
tests/fixtures/load.py. Every test here records the
figures it measured (requests sent, errors, recovery times) with ``report.add(...)``; with
``CSMF_RELIABILITY_REPORT=<path>`` set, the session writes them to that markdown file, which is
how bench/results/reliability.md is made (command in its header).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest

from csmf.atomic import atomic_write_text
from csmf.results import table

ROOT = Path(__file__).resolve().parents[2]
REPORT_ENV = "CSMF_RELIABILITY_REPORT"
REPORT_COMMAND = (
    "CSMF_RELIABILITY_REPORT=bench/results/reliability.md "
    ".venv/bin/python -m pytest tests/reliability -q"
)

# -- report ----------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str]]] = []

    def add(self, title: str, rows: dict[str, object], note: str = "") -> None:
        lines = table(["figure", "value"], rows.items())
        if note:
            lines += ["", note]
        self.sections.append((title, lines))

    def write(self, path: Path, duration: float) -> None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            commit = "?"
        head = [
            "# Reliability suite: figures",
            "",
            "Written by the tests themselves (tests/reliability/); regenerate with:",
            "",
            f"    {REPORT_COMMAND}",
            "",
            f"Commit {commit or '?'}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()} with {os.cpu_count()} CPUs shared with other jobs (load "
            f"average {os.getloadavg()[0]:.1f} at the end: times here are inflated accordingly); "
            f"suite wall time {duration:.0f} s. Loopback only: real `csmf serve` (uvicorn), "
            "real redis-server, real FAISS bundles (tiny: 1,500 items).",
            "",
        ]
        body = []
        for title, lines in sorted(self.sections, key=lambda s: s[0]):
            body += [f"## {title}", "", *lines, ""]
        atomic_write_text(path, "\n".join(head + body))


@pytest.fixture(scope="session")
def report():
    r = Report()
    t0 = time.monotonic()
    yield r
    target = os.environ.get(REPORT_ENV)
    if target and r.sections:
        r.write(Path(target), time.monotonic() - t0)
