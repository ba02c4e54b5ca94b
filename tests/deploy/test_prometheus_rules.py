"""promtool on the project's Prometheus files: config and rules are valid, and the rule unit tests
(deploy/prometheus/alerts_test.yml) pass and cover every alert both firing and not firing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"


def _run(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{out}"
    return out


def _alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_check_config(promtool):
    out = _run(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_promtool_check_rules(promtool):
    out = _run(promtool, "check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(_alert_names())} rules found" in out


def test_promtool_test_rules(promtool):
    out = _run(promtool, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out and "FAILED" not in out


def test_every_alert_is_tested_firing_and_not_firing():
    cases: dict[str, set[str]] = {}
    for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            kind = "fires" if case.get("exp_alerts") else "silent"
            cases.setdefault(case["alertname"], set()).add(kind)
    missing = {a: {"fires", "silent"} - cases.get(a, set()) for a in _alert_names()}
    assert not {a: m for a, m in missing.items() if m}, f"untested alert outcomes: {missing}"
    unknown = set(cases) - set(_alert_names())
    assert not unknown, f"alerts_test.yml tests alerts that alerts.yml does not define: {unknown}"


def test_every_alert_has_severity_summary_and_an_existing_runbook_section():
    docs = (ROOT / "docs" / "operations.md").read_text()
    # GitHub-style anchors of the markdown headings
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+\s+(.+)$", docs, flags=re.M)
    }
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"] if "alert" in r):
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md", name
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/operations.md"
