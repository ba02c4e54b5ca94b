"""csmf.results: the one table renderer and results writer; every results file names its command,
and nothing else in the repo renders markdown tables or edits sys.path in bench/."""

from __future__ import annotations

import json
import re
import subprocess
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


def test_run_header_names_commit_date_and_load(tmp_path):
    from csmf.results import finish_run, run_info, run_line, source_commit

    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    info = finish_run(run_info(ROOT))
    assert info["commit"].split()[0] == sha
    line = run_line(info)
    assert re.fullmatch(
        r"Run \d{4}-\d\d-\d\d \d\d:\d\d UTC at [0-9a-f]+( \+ uncommitted changes)?; load average "
        r"[\d.]+ before, [\d.]+ after, \d+ cores\.",
        line,
    ), line
    assert source_commit(tmp_path) == "unknown"  # not a git checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "csmf").mkdir()
    (repo / "csmf" / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    assert "uncommitted" not in source_commit(repo)
    (repo / "csmf" / "a.py").write_text("x = 2\n")
    assert source_commit(repo).endswith(" + uncommitted changes")
    assert "uncommitted" not in source_commit(repo, watched=("service",))
