"""Benchmark results: one markdown-table renderer and one writer of the ``.json`` + ``.md`` pair.

Every results file (``bench/results/*``, ``csmf bench``'s outputs, ``csmf eval``'s table) is
rendered by :func:`table` and written by :func:`write_results`, which puts the exact command that
made the numbers into both files: the JSON's ``"command"`` and the line under the markdown's
title. :func:`run_info` records the rest of a run's header — commit, date, machine load before and
after — and :func:`run_line` renders it. It lives in ``csmf/`` because the ``csmf bench`` commands (``bench/harness/``), the scripts
in ``bench/`` (run as ``python bench/<name>.py``: the repo's packages, ``bench.harness`` included,
come from the install, their siblings from the script's folder — no ``sys.path`` edits) and
``csmf eval`` all write results.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from csmf.atomic import atomic_write_text, write_json

ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """GitHub-markdown table lines. Cells are ``str()``-ed as given (format numbers before);
    ``align`` is one letter per column, l / r / c (default: left)."""
    header = list(header)
    spec = align.ljust(len(header), "l")
    if len(spec) != len(header) or set(spec) - set(ALIGN):
        raise ValueError(f"align needs one of l/r/c per column ({len(header)}), got {align!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(ALIGN[a] for a in spec) + "|"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row {cells} has {len(cells)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pm(mean_std: Sequence[float] | None, spec: str = ".4f") -> str:
    """``mean ± std`` of a (mean, std) pair; ``n/a`` for None."""
    if mean_std is None:
        return "n/a"
    return f"{mean_std[0]:{spec}} ± {mean_std[1]:{spec}}"


def script_command(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """How a ``bench/`` script was run, as a user would type it again from the repo root:
    ``python bench/serve.py --items 100000`` (``script`` = its ``__file__``; ``sys.argv``)."""
    p = Path(script)
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"{p.parent.name}/{p.name}", shlex.join(args)]).rstrip()


def source_commit(root: str | Path | None = None, watched: Sequence[str] = ("csmf",)) -> str:
    """The short hash of ``root``'s checkout (default: this repo), with ``+ uncommitted changes``
    if files under ``watched`` differ from it; ``unknown`` outside git."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if sha.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no", "--", *watched],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return sha.stdout.strip() + (" + uncommitted changes" if dirty else "")


def run_info(root: str | Path | None = None, watched: Sequence[str] = ("csmf",)) -> dict[str, Any]:
    """A run's header at its start: UTC date, commit (:func:`source_commit`) and the 1-minute
    load average; call :func:`finish_run` at the end to add the load after."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": source_commit(root, watched),
        "load_before": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
    }


def finish_run(info: Mapping[str, Any]) -> dict[str, Any]:
    return {**info, "load_after": round(os.getloadavg()[0], 2)}


def run_line(info: Mapping[str, Any]) -> str:
    """``Run <date> at <commit>; load average <before> before, <after> after, <n> cores.``"""
    load = f"load average {info['load_before']:.2f} before"
    if "load_after" in info:
        load += f", {info['load_after']:.2f} after"
    return f"Run {info['date']} at {info['commit']}; {load}, {info['cores']} cores."


def markdown(title: str, command: str, body: Sequence[str] | str) -> str:
    """A results page: the title, the command that made it, then the body."""
    lines = body.splitlines() if isinstance(body, str) else list(body)
    return "\n".join([f"# {title}", "", f"`{command}`", "", *lines]).rstrip() + "\n"


def write_results(
    stem: str | Path, title: str, command: str, body: Sequence[str] | str, doc: Mapping[str, Any]
) -> tuple[Path, Path]:
    """``<stem>.json`` = ``{"command": command, **doc}`` and ``<stem>.md`` = :func:`markdown`,
    both published atomically. Returns (markdown path, JSON path)."""
    stem = Path(stem)
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    write_json(js, {"command": command, **doc})
    atomic_write_text(md, markdown(title, command, body))
    return md, js
