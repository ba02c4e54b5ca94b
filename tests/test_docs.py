"""References in code and docs point at headings that exist: the design of record is
docs/design.md, and every link into it (``docs/design.md#anchor``, or ``design.md#anchor`` from
docs/) names one of its headings under GitHub's anchor rules. Section-number references to a
design outside the repository ("DESIGN" + " §N") and issue numbers are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
# Scanned: the packages, benchmarks, deploy files, configs, docs, tests and the top-level files.
FOLDERS = (
    "csmf",
    "trainer",
    "index_builder",
    "service",
    "bench",
    "deploy",
    "configs",
    "docs",
    "tests",
)
TOP_FILES = ("README.md", "Makefile", "Dockerfile", "pyproject.toml")
TEXT = {".py", ".md", ".toml", ".yml", ".yaml", ".html", ".cfg", ".ini", ".txt", ".sh"}
SKIP_PARTS = {"__pycache__", ".pytest_cache", "node_modules"}

OLD_DESIGN = re.compile("DESIGN" + r"(?:'s)? " + "§" + r"\s*\d+")
ISSUE = re.compile(r"\bissues?[- ]#?\d+", re.IGNORECASE)
LINK = re.compile(r"(?<![\w/.-])(?:docs/)?design\.md#([A-Za-z0-9_-]+)")


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lowercase, punctuation other than '-' and
    '_' dropped, spaces to '-', and '-1', '-2', ... appended to repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_fence or not m:
            continue
        text = re.sub(r"`|\*\*|\*|\[([^\]]*)\]\([^)]*\)", lambda g: g.group(1) or "", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return anchors


def text_files() -> list[Path]:
    """Every scanned text file but this one (whose patterns would match themselves)."""
    files = [ROOT / f for f in TOP_FILES if (ROOT / f).is_file()]
    for folder in FOLDERS:
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and p.suffix in TEXT and not SKIP_PARTS & set(p.parts):
                files.append(p)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


@pytest.fixture(scope="module")
def anchors() -> set[str]:
    return github_anchors(DESIGN.read_text())


def test_anchor_rules_follow_github():
    md = (
        "# A `b` c\n## Owned units, and why!\n## Owned units, and why!\n```\n# not a heading\n```\n"
    )
    assert github_anchors(md) == {"a-b-c", "owned-units-and-why", "owned-units-and-why-1"}


def test_no_reference_to_the_old_design_sections():
    found = [
        f"{_rel(p)}: {m.group(0)}"
        for p in text_files()
        for m in OLD_DESIGN.finditer(p.read_text(errors="replace"))
    ]
    assert found == [], "link docs/design.md#<heading> instead: " + "; ".join(found)


def test_every_design_link_names_a_heading(anchors):
    dangling = [
        f"{_rel(p)}: design.md#{anchor}"
        for p in text_files()
        for anchor in LINK.findall(p.read_text(errors="replace"))
        if anchor not in anchors
    ]
    assert dangling == [], f"no such heading in docs/design.md: {dangling}"


def test_no_issue_numbers():
    found = [
        f"{_rel(p)}: {m.group(0)}"
        for p in text_files()
        for m in ISSUE.finditer(p.read_text(errors="replace"))
    ]
    assert found == [], f"say what the code does, not which issue asked for it: {found}"


ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|root|home)/[\w.-]")
MD_LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_markdown_links_name_headings_that_exist():
    """``[text](other.md#anchor)`` and ``[text](#anchor)`` in README.md and docs/*.md."""
    dangling = []
    for md in _markdown_files():
        for target, anchor in MD_LINK.findall(md.read_text()):
            path = md if not target else (md.parent / target).resolve()
            if path.suffix != ".md":
                continue
            if not path.is_file() or anchor not in github_anchors(path.read_text()):
                dangling.append(f"{_rel(md)}: {target}#{anchor}")
    assert dangling == []


def test_readme_is_a_user_guide_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; long text goes to docs/"
    first = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert lines[first] == "## The two commands"


def test_no_absolute_machine_paths_in_docs_and_results():
    files = _markdown_files() + sorted(
        p for p in (ROOT / "bench" / "results").iterdir() if p.suffix != ".png"
    )
    found = [
        f"{_rel(p)}: {m.group(0)}"
        for p in files
        for m in ABSOLUTE.finditer(p.read_text(errors="replace"))
    ]
    assert found == [], f"use paths relative to the repository: {found}"
