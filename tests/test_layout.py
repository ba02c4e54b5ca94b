"""The architecture rules of STYLE.md, checked by walking imports with ast."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("service", {"trainer", "index_builder", "daily", "bench"}),
        ("index_builder", {"trainer", "service", "daily", "bench"}),
        ("trainer", {"service", "index_builder", "daily", "bench"}),
        # the scheduled update drives trainer and index_builder, and the service only over HTTP
        ("daily", {"service", "fastapi", "bench"}),
    ],
)
def test_packages_import_only_toward_csmf(package, forbidden):
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p, m in _imports(package) if m in forbidden]
    assert not bad, bad


def test_contract_does_not_import_the_stages():
    # csmf/cli.py assembles the subcommands, lazily and by name (importlib), so it is not an import
    bad = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p, m in _imports("csmf")
        if m in {"trainer", "index_builder", "service", "daily", "bench", "fastapi"}
    ]
    assert not bad, bad


def test_index_backends_do_not_need_torch():
    """csmf/index is imported by the torch-free service install
    (docs/design.md#where-things-live)."""
    bad = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p, m in _imports("csmf/index")
        if m in {"torch", "trainer", "index_builder", "service", "fastapi"}
    ]
    assert not bad, bad
