"""Benchmark results: one markdown-table renderer and one writer of the ``.json`` + ``.md`` pair.

Every results file (``bench/results/*``, ``csmf bench``'s outputs, ``csmf eval``'s table) is
rendered by :func:`table` and written by :func:`write_results`, which puts the exact command that
made the numbers into both files: the JSON's ``"command"`` and the line under the markdown's
title. It lives in ``csmf/`` because both the ``csmf bench`` commands (``trainer/``) and the
scripts in ``bench/`` (run as ``python bench/<name>.py``: the repo's packages come from the install,
their siblings from the script's folder — no ``sys.path`` edits) write results.
"""

from __future__ import annotations

import shlex
import sys
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
