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


RESULTS = ROOT / "bench" / "results"
# A citation of a results file: a markdown link to it, or its path (or, for a file that exists in
# bench/results/, its bare name) in backticks. `git show REV:bench/results/x.md` cites an old
# version and is not one.
RESULT_CITE = re.compile(r"(?:\]\(|`)((?:[^)\s#`]*bench/results/)?[\w.-]+\.md)(?:#[^)\s`]*)?[)`]")
# Numbers precise enough to go stale: a decimal point, a percent sign or thousands separators
# (an integer such as "3 seeds" or "50" is too often a count or a setting to check).
NUMBER = re.compile(
    r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+(?:\.\d+)?\s?%)(?![\w.]*\d)"
)
OLD_VERSION = "`git show "
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def cited_units(markdown: str) -> list[tuple[str, str]]:
    """(unit, context) for the sentences of paragraphs, list items and table rows outside code
    fences. A sentence or list item stands alone (context ""); a table is cited by its section
    (heading to heading), so a row's context is the section's text and its unit the cells after
    the first (a label such as "fixed 75 %" is a setting, not a result). A row, or a table
    introduced by a paragraph, naming an older version (`git show REV:...`) is left out."""
    units: list[tuple[str, str]] = []
    para: list[str] = []
    section: list[str] = []
    rows: list[str] = []
    before = ""

    def flush() -> None:
        nonlocal before
        if para:
            text = " ".join(para)
            units.extend((u, "") for u in re.split(r"(?<=[.!?])\s+(?=[A-Z\[(*_])", text))
            before = text
            para.clear()

    def end_section() -> None:
        units.extend((row, " ".join(section)) for row in rows)
        rows.clear()
        section.clear()

    in_fence = False
    for line in markdown.splitlines():
        s = line.strip()
        if s.startswith("#") and not in_fence:
            flush()
            end_section()
            before = ""
        section.append(s)
        if s.startswith("```"):
            flush()
            in_fence = not in_fence
        elif in_fence:
            continue
        elif s.startswith("|"):
            flush()
            if OLD_VERSION not in before + s:
                rows.append("|" + s.split("|", 2)[-1] if s.count("|") > 2 else s)
        elif not s or s.startswith("#"):
            flush()
        else:
            if re.match(r"(?:[-*]|\d+\.)\s", s):
                flush()
            para.append(s)
    flush()
    end_section()
    return units


def _cited(text: str) -> list[str]:
    return [
        c for c in RESULT_CITE.findall(text) if "bench/results/" in c or (RESULTS / c).is_file()
    ]


def stated_numbers(unit: str) -> list[str]:
    """The numbers a sentence states, not those inside link targets or code spans."""
    prose = re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", "", unit))
    return [THOUSANDS.sub("", m.group(1)).replace(" ", "") for m in NUMBER.finditer(prose)]


def _holds(text: str, number: str) -> bool:
    pattern = re.escape(number).replace("%", r"\s?%")
    return re.search(rf"(?<![\d.]){pattern}(?!\d)", text) is not None


def test_cited_numbers_appear_in_the_results_file():
    """Every number stated in the same sentence or list item as a citation of
    ``bench/results/X.md`` (README.md, docs/results.md), or in a table of a section citing X,
    appears in X: a rerun that changes a number fails here until the prose says the new one. A
    figure derived from the file (a difference, a rounding) is written as the file's values
    instead; one read from an older version of the file says so with
    `git show REV:bench/results/X.md`."""
    stale = []
    for md in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        for unit, context in cited_units(md.read_text()):
            cited = _cited(unit) or _cited(context)
            if not cited or OLD_VERSION in unit:
                continue  # `git show REV:bench/results/x.md`: stated against an older version
            files = [RESULTS / Path(c).name for c in cited]
            missing = [c for c, f in zip(cited, files, strict=True) if not f.is_file()]
            assert not missing, f"{_rel(md)} cites missing results files {missing}"
            text = THOUSANDS.sub("", "\n".join(f.read_text() for f in set(files)))
            stale += [
                f"{_rel(md)}: {n} not in {sorted({f.name for f in files})}: {unit[:120]}"
                for n in stated_numbers(unit)
                if not _holds(text, n)
            ]
    assert stale == [], "\n".join(stale)


def test_stated_numbers_are_found_in_prose_not_in_links_or_code():
    unit = "[1.25× at 2,284 req/s](../bench/results/w0.95.md), `--set a=0.5`, 10 % and 3 seeds"
    assert stated_numbers(unit) == ["1.25", "2284", "10%"]
    md = "# T\n## H `a.md`\nA 0.5. B [x](y.md) 1.2.\n\n| a 75 % | 0.3 |\n- item 0.4\n  more\n## I"
    assert cited_units(md) == [
        ("A 0.5.", ""),
        ("B [x](y.md) 1.2.", ""),
        ("- item 0.4 more", ""),
        ("| 0.3 |", "## H `a.md` A 0.5. B [x](y.md) 1.2.  | a 75 % | 0.3 | - item 0.4 more"),
    ]
    old = "## H `a.md`\nFrom `git show c1:bench/results/a.md`:\n\n| a | 0.3 |\n"
    assert [u for u, _ in cited_units(old)] == ["From `git show c1:bench/results/a.md`:"]
    assert _holds("| 2284 | 0.20 |", "2284") and not _holds("| 0.20 |", "0.2")
    cites = "[a](../bench/results/x.md#h), `serve.md`, `git show c1:bench/results/y.md`"
    assert RESULT_CITE.findall(cites) == ["../bench/results/x.md", "serve.md"]
