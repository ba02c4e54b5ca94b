"""csmf.results: the one table renderer and results writer; every results file names its command,
and nothing else in the repo renders markdown tables or edits sys.path in bench/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from csmf.results import pm, script_command, table, write_results

ROOT = Path(__file__).resolve().parents[2]


def test_table_renders_github_markdown():
    lines = table(["method", "recall"], [["csmf", pm((0.25, 0.0125))], ["pop", 0.1]], "lr")
    assert lines == [
        "| method | recall |",
        "|---|---:|",
        "| csmf | 0.2500 ± 0.0125 |",
        "| pop | 0.1 |",
    ]
    assert pm(None) == "n/a" and pm((1.0, 0.5), ".1f") == "1.0 ± 0.5"
    with pytest.raises(ValueError, match="has 1 cells for 2 columns"):
        table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="align"):
        table(["a"], [], "x")


def test_results_files_name_the_command_that_made_them(tmp_path):
    cmd = script_command(ROOT / "bench" / "serve.py", ["--items", "1000", "--out", "a b"])
    assert cmd == "python bench/serve.py --items 1000 --out 'a b'"
    md, js = write_results(tmp_path / "r" / "demo", "Demo", cmd, table(["x"], [[1]]), {"n": 1})
    assert (md.name, js.name) == ("demo.md", "demo.json")
    assert json.loads(js.read_text()) == {"command": cmd, "n": 1}
    assert md.read_text() == f"# Demo\n\n`{cmd}`\n\n| x |\n|---|\n| 1 |\n"


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_one_renderer_and_no_sys_path_edits():
    """Markdown table rules (|---|) are written only by csmf/results.py; bench/ scripts import the
    installed packages and their siblings without editing sys.path."""
    rule = re.compile(r"""["']\|?:?-{3}:?\|""")
    offenders = [
        str(p.relative_to(ROOT))
        for p in _sources("csmf", "trainer", "index_builder", "service", "bench")
        if p.name != "results.py" and rule.search(p.read_text())
    ]
    assert offenders == []
    assert [p.name for p in _sources("bench") if "sys.path" in p.read_text()] == []
