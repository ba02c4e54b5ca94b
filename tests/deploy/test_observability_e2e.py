"""The dashboard and the alerts against reality: a real service (``csmf serve``, 2 uvicorn workers,
a real Redis) and a real Pushgateway holding what ``csmf daily`` pushes (its own export code)
scraped every second by a real Prometheus running the project's own
deploy/prometheus/prometheus.yml and alerts.yml (only the targets are rewritten).

After traffic across two scenarios (plus explicit weights, bad requests and a failed reload),
EVERY PromQL expression of deploy/grafana/dashboards/csmf.json and of alerts.yml is evaluated
through Prometheus's HTTP API — they are parsed out of those files, so a new panel or alert is
tested without touching this file:

- every dashboard query returns data with at least one finite value;
- every metric selector of every expression matches real series: equality matchers must match an
  existing label value, regex/negative matchers a label that exists (``status=~"5.."`` may
  rightly match nothing in a healthy run, but ``status`` must be a label of that metric);
- alert expressions: all are valid; EXPECTED_FIRING fire, every other alert is expected empty;
- then Redis is stopped: CsmfStoreDown's expression returns data, and the service keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "csmf.json"
ADMIN_TOKEN = "e2e-admin-token"
SCENARIOS = ("default", "homepage")  # "default" exists from the start; "homepage" is created

# In the healthy run (after one deliberately failed reload), exactly these alerts' expressions
# return data; every other alert of alerts.yml must be empty (not firing).
EXPECTED_FIRING = {"CsmfReloadFailed"}
# Fire once Redis is stopped (phase 2).
EXPECTED_FIRING_WITHOUT_REDIS = {"CsmfStoreDown"}

# What Grafana substitutes before sending a query. $instance is the dashboard's multi-value
# variable at "All" (its allValue); windows are generous so slow CI keeps samples in them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$instance": ".*"}

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- expressions


def dashboard_queries(path: Path = DASHBOARD) -> dict[str, str]:
    """{"panel title [refId]": PromQL} for every target of every panel, rows included."""
    out: dict[str, str] = {}

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out[f"{p['title']} [{t['refId']}]"] = t["expr"]

    walk(json.loads(path.read_text())["panels"])
    return out


def dashboard_variables(path: Path = DASHBOARD) -> dict[str, tuple[str, str]]:
    """{"$name": (PromQL, label)} of the query variables: ``label_values(expr, label)`` becomes
    ``group by (label) (expr)``, whose results must carry that label."""
    out = {}
    for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", q)
        assert m, f"variable ${var['name']}: only label_values(expr, label) is supported, got {q!r}"
        out[f"${var['name']}"] = (f"group by ({m.group(2)}) ({m.group(1)})", m.group(2))
    return out


def alert_exprs(path: Path = PROMETHEUS_DIR / "alerts.yml") -> dict[str, str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_LABEL_LIST_BEFORE = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_MATCHER = re.compile(
    r"""\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*,?"""
)


def _close(expr: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket matching expr[i] == open_, skipping string literals."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _close_string(expr, i)
            continue
        depth += (c == open_) - (c == close)
        i += 1
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {open_!r} in {expr!r}")


def _close_string(expr: str, i: int) -> int:
    quote, i = expr[i], i + 1
    while expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    return i + 1


def selectors(expr: str) -> list[tuple[str, tuple[tuple[str, str, str], ...]]]:
    """The vector selectors of a PromQL expression: [(metric, ((label, op, value), ...))].

    A small lexer, enough for this project's expressions: skips strings, range/subquery brackets,
    numbers and durations, function and aggregation names, keywords and the label lists after
    by/without/on/ignoring/group_left/group_right.
    """
    out, i = [], 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _close_string(expr, i)
        elif c == "[":
            i = _close(expr, i, "[", "]")
        elif c == "#":  # comment to the end of the line
            j = expr.find("\n", i)
            i = len(expr) if j < 0 else j
        elif c.isdigit() or (c == "." and expr[i + 1 : i + 2].isdigit()):
            while i < len(expr) and (expr[i].isalnum() or expr[i] == "."):
                i += 1
        elif c == "{":  # a selector without a metric name
            end = _close(expr, i, "{", "}")
            out.append(("", _matchers(expr[i + 1 : end - 1])))
            i = end
        elif c.isalpha() or c in "_:":
            m = re.match(r"[A-Za-z_:][\w:]*", expr[i:])
            name, i = m.group(0), i + m.end()
            j = len(expr) - len(expr[i:].lstrip())
            nxt = expr[j : j + 1]
            if name in _LABEL_LIST_BEFORE:
                i = _close(expr, j, "(", ")") if nxt == "(" else i
            elif name in _KEYWORDS or name in _AGGREGATIONS or nxt == "(":
                continue
            elif nxt == "{":
                end = _close(expr, j, "{", "}")
                out.append((name, _matchers(expr[j + 1 : end - 1])))
                i = end
            else:
                out.append((name, ()))
        else:
            i += 1
    return out


def _matchers(body: str) -> tuple[tuple[str, str, str], ...]:
    found, pos = [], 0
    while pos < len(body.strip()):
        m = _MATCHER.match(body, pos)
        assert m, f"cannot parse label matchers {body!r}"
        label, op, quoted = m.groups()
        found.append((label, op, quoted[1:-1]))
        pos = m.end()
    return tuple(found)


def selector_checks(name: str, matchers) -> dict[str, str]:
    """PromQL queries that must each return data for this selector to be meaningful."""
    eq = [(label, v) for label, op, v in matchers if op == "="]
    sel = ", ".join([f'__name__="{name}"'] * bool(name) + [f'{label}="{v}"' for label, v in eq])
    checks = {f"{{{sel}}}": f"count({{{sel}}})"}
    for label, op, _ in matchers:
        if op != "=" and label != "__name__":
            checks[f"{name}: label {label!r}"] = f'count({{{sel}, {label}!=""}})'
    return checks


def test_selector_lexer():
    # Runs without Prometheus: the lexer the end-to-end test relies on.
    expr = """(histogram_quantile(0.99, sum by (le, route) (rate(m_bucket{route="/v1/x", a=~"b|c"}[5m])))
              > 0.015) and on (route) sum by (route) (rate(m_count{route!~"/metrics|/h"}[5m] offset 1m)) > 1
              or vector(0) / count(count by (v) (info)) * 1e3 + up{job='j',instance=~".*"}"""
    assert selectors(expr) == [
        ("m_bucket", (("route", "=", "/v1/x"), ("a", "=~", "b|c"))),
        ("m_count", (("route", "!~", "/metrics|/h"),)),
        ("info", ()),
        ("up", (("job", "=", "j"), ("instance", "=~", ".*"))),
    ]


def test_every_expression_has_a_selector_and_no_unknown_variable():
    variables = {k: expr for k, (expr, _) in dashboard_variables().items()}
    exprs = {**dashboard_queries(), **variables, **alert_exprs()}
    assert len(dashboard_queries()) >= 20 and len(alert_exprs()) >= 4 and variables
    for where, expr in exprs.items():
        assert selectors(substitute(expr)), f"{where}: no metric selector in {expr!r}"


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    tail = Path(log).read_text()[-3000:] if log else ""
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def _process(args: list[str], log: Path, env: dict | None = None):
    """A subprocess logging to ``log``, stopped on exit even when startup checks fail."""
    with log.open("w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    try:
        yield proc
    finally:
        _stop(proc)


@pytest.fixture
def redis_server(tmp_path):
    redis_bin = shutil.which(os.environ.get("REDIS_SERVER", "redis-server"))
    if redis_bin is None:
        pytest.skip("redis-server is not installed (Debian's redis-server package)")
    port, log = _free_port(), tmp_path / "redis.log"
    args = [
        redis_bin,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with _process(args, log) as proc:
        _wait_until(lambda: _port_open(port), 10, "redis-server", proc, log)
        yield proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def live_service(tmp_path, flat_bundle, redis_server):
    """`csmf serve` with 2 workers (multi-process metrics, as in compose) on a free loopback port."""
    _, redis_url = redis_server
    port, log = _free_port(), tmp_path / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CSMF_", "PROMETHEUS_"))}
    env.update(
        CSMF_REDIS_URL=redis_url,
        CSMF_ADMIN_TOKEN=ADMIN_TOKEN,
        CSMF_SCENARIOS_FILE=str(tmp_path / "scenarios.json"),
        TMPDIR=str(tmp_path),
    )
    args = [sys.executable, "-m", "csmf.cli", "serve", "--bundle", str(flat_bundle)]
    args += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    with (
        _process(args, log, env) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        _wait_until(lambda: client.get("/readyz").is_success, 90, "/readyz", proc, log)
        yield client, port, log


@pytest.fixture
def pushgateway(tmp_path, pushgateway_bin):
    """A Pushgateway holding a successful daily update, pushed by daily.metrics.export."""
    from daily.metrics import export

    port, log = _free_port(), tmp_path / "pushgateway.log"
    args = [pushgateway_bin, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with _process(args, log) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: httpx.get(f"{url}/-/ready").is_success, 30, "pushgateway", proc, log)
        now = time.time()
        gate = {
            "candidate": {t: {"recall": 0.41, "ndcg": 0.2} for t in ("click", "conversion")},
            "serving": {t: {"recall": 0.40, "ndcg": 0.2} for t in ("click", "conversion")},
        }
        attempt = {
            "finished_at": now, "outcome": "published", "gate": gate,
            "steps": {"events": 0.1, "train": 60.0, "gate": 2.0, "build": 5.0},
            "replicas": [{"ok": True}, {"ok": True}],
        }  # fmt: skip
        status = {"last_attempt": attempt, "last_success": attempt}
        assert export(status, 26 * 3600, tmp_path, url) is None
        yield port


def prometheus_config(service_port: int, prometheus_port: int, pushgateway_port: int) -> dict:
    """The project's prometheus.yml, scraping every second, its csmf job pointed at the test
    service (instead of Docker DNS), its pushgateway job at the test gateway, and rule files made
    absolute."""
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROMETHEUS_DIR / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    csmf = jobs["csmf"]
    assert csmf.pop("dns_sd_configs"), "the csmf job is expected to discover replicas by DNS"
    csmf["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    assert jobs["pushgateway"]["honor_labels"] is True, "pushed job labels must be kept"
    jobs["pushgateway"]["static_configs"] = [{"targets": [f"127.0.0.1:{pushgateway_port}"]}]
    return cfg


@pytest.fixture
def prometheus(tmp_path, prometheus_bin, live_service, pushgateway):
    _, service_port, _ = live_service
    port, log = _free_port(), tmp_path / "prometheus.log"
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(prometheus_config(service_port, port, pushgateway)))
    args = [prometheus_bin, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    args += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with (
        _process(args, log) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        _wait_until(lambda: client.get("/-/ready").is_success, 30, "prometheus", proc, log)
        # Target discovery hands targets over in batches every 5 s: wait for a first scrape, or
        # the traffic would all land before it and every counter would look flat.
        up = 'up{job="csmf"} == 1'
        _wait_until(lambda: query(client, up), 30, "a first scrape of the service", proc, log)
        yield client


# --------------------------------------------------------------------------- traffic


def send_traffic(client: httpx.Client, seconds: float = 4.0) -> int:
    """Retrieve calls across SCENARIOS and explicit weights, spread over several scrapes, plus a
    batch call, two client errors and a failed reload. Returns the number of retrieve calls."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    objectives = client.get("/admin/bundle", headers=admin).raise_for_status().json()["objectives"]
    weights = [float(i + 1) for i in range(len(objectives))]  # list in cascade order
    r = client.put(f"/admin/scenarios/{SCENARIOS[1]}", headers=admin, json={"weights": weights})
    assert r.status_code == 200, r.text
    calls, i, end = 0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        body = {"user_id": f"u{i % 60}", "k": 10}
        if i % 3 == 2:
            body["weights"] = weights[::-1]
        else:
            body["scenario"] = SCENARIOS[i % 2]
        r = client.post("/v1/retrieve", json=body)
        assert r.status_code == 200, r.text
        calls, i = calls + 1, i + 1
        time.sleep(0.03)
    users = [{"user_id": f"u{j}"} for j in range(5)] + [{"user_id": "nobody-e2e"}]
    r = client.post("/v1/retrieve/batch", json={"users": users, "k": 5, "scenario": SCENARIOS[1]})
    assert r.status_code == 200, r.text
    assert client.post("/v1/retrieve", json={"user_id": "u1", "k": 0}).status_code == 422
    r = client.post("/v1/retrieve", json={"user_id": "u1", "scenario": "no-such-scenario"})
    assert r.status_code == 404
    r = client.post("/admin/reload", headers=admin, json={"bundle": "/nonexistent/bundle"})
    assert r.status_code == 422, r.text  # the failed reload that CsmfReloadFailed must see
    return calls + 1


# --------------------------------------------------------------------------- evaluation


def query(prom: httpx.Client, expr: str) -> list[dict]:
    r = prom.post("/api/v1/query", data={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def problems(prom: httpx.Client, *, firing: set[str]) -> list[str]:
    """Everything wrong with the dashboard and alert expressions right now (empty = all good)."""
    out = []
    dashboard = {k: substitute(v) for k, v in dashboard_queries().items()}
    alerts = alert_exprs()
    for where, expr in dashboard.items():
        if not _finite(query(prom, expr)):
            out.append(f"dashboard {where}: no finite data for {expr}")
    for where, (expr, label) in dashboard_variables().items():
        if not any(s["metric"].get(label) for s in query(prom, expr)):
            out.append(f"dashboard variable {where}: no {label!r} values from {expr}")
    for name, expr in alerts.items():
        got = bool(query(prom, expr))
        if got != (name in firing):
            out.append(f"alert {name}: expected {'firing' if name in firing else 'empty'}, got "
                       f"{'data' if got else 'empty'} for {expr}")  # fmt: skip
    checked = set()
    variables = [expr for expr, _ in dashboard_variables().values()]
    for expr in [*dashboard.values(), *variables, *alerts.values()]:
        for name, matchers in selectors(expr):
            for what, check in selector_checks(name, matchers).items():
                if check in checked:
                    continue
                checked.add(check)
                if not query(prom, check):
                    out.append(f"selector {what} matches no series ({check}) in: {expr}")
    return out


def _retry(check, timeout: float) -> list[str]:
    """Prometheus needs a scrape or two after the traffic: retry until nothing is wrong."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def test_dashboard_and_alerts_against_real_prometheus(live_service, prometheus, redis_server):
    client, _, service_log = live_service
    calls = send_traffic(client)

    # The project's rules are loaded and evaluate without error, and the service is scraped.
    def scraped() -> bool:
        r = query(prometheus, "sum(csmf_retrieve_requests_total)")
        return bool(r) and float(r[0]["value"][1]) >= calls

    _wait_until(scraped, 20, "a scrape that saw all the traffic")
    time.sleep(2.5)  # two more scrapes: every new series has the 2 samples rate() needs

    found = _retry(lambda: problems(prometheus, firing=EXPECTED_FIRING), timeout=20)
    assert not found, "\n".join(found)

    rules = prometheus.get("/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(alert_exprs()) <= set(loaded)
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    targets = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets}["csmf"] == "up"

    # Phase 2: Redis goes away. The replica keeps serving its last known scenarios (so /readyz
    # stays 200, which the k8s readiness probe relies on) and CsmfStoreDown's condition holds.
    _stop(redis_server[0])
    _wait_until(
        lambda: query(prometheus, 'csmf_store_up{store="weights"} == 0'), 20, "weights store down"
    )
    r = client.post("/v1/retrieve", json={"user_id": "u1", "k": 5, "scenario": SCENARIOS[1]})
    assert r.status_code == 200, r.text
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "degraded" in ready.text, ready.text

    firing = EXPECTED_FIRING | EXPECTED_FIRING_WITHOUT_REDIS
    alerts = alert_exprs()
    found = _retry(
        lambda: [
            f"alert {n}: expected data, got none"
            for n in sorted(firing)
            if not query(prometheus, alerts[n])
        ],
        timeout=10,
    )
    assert not found, "\n".join(found) + "\n" + service_log.read_text()[-2000:]
