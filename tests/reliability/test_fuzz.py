"""API fuzzing: schemathesis over the OpenAPI document a real `csmf serve` publishes.

Every operation (retrieve, batch, feedback, admin, health, metrics, playground) gets schemathesis'
coverage phase (deterministic cases at each documented constraint's edges: a weight of exactly
1e6 and one of 1e6 + 1, -1, wrong types, missing required fields, ...) and a bounded number of
random valid (positive) and schema-violating (negative) requests. Checked for every response: no
5xx, status code documented, body valid against the documented response schema, content type
documented, and invalid input refused with a 4xx. Admin operations are fuzzed twice: with the
admin token (generated data really creates, replaces, deletes scenarios and reloads bundles), and
with whatever `authorization` header the fuzzer makes up (or none): then every call must be
refused and the scenario list and the loaded bundle must be unchanged.

Extreme weights: the weights schema carries ``minimum: 0, maximum: 1e6``, so the
fuzzer sends values past both bounds to retrieve, batch and scenario writes;
``test_fuzzer_sent_extreme_weights`` proves it did, and every one was answered 422.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from fixtures.services import AUTH, ServiceProcess
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow
EXAMPLES = 6  # random cases per operation and mode (valid, invalid), after the coverage phase
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests every run: a CI failure reproduces locally
    database=None,
    suppress_health_check=list(HealthCheck),
)
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, bundles):
    tmp = tmp_path_factory.mktemp("fuzz")
    svc = ServiceProcess(bundles["flat"], tmp, workers=1)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES
    )
    return schema


@pytest.fixture(scope="module")
def admin(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=10) as c:
        yield c


def _state(admin: httpx.Client) -> tuple:
    """What an admin call could change: scenarios (with versions) and the loaded bundle."""
    scenarios = admin.get("/admin/scenarios").json()["scenarios"]
    bundle = admin.get("/admin/bundle").json()
    return (
        [(s["name"], s["version"], s["weights"]) for s in scenarios],
        bundle["model_version"],
        bundle["loaded_at"],
    )


def _count(key: str, status: int) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + 1
    if status >= 500:
        COUNTS["5xx"] = COUNTS.get("5xx", 0) + 1


# Every operation of the service (method, path); test_every_operation_is_fuzzed keeps it complete.
OPERATIONS = [
    ("POST", "/v1/retrieve"),
    ("POST", "/v1/retrieve/batch"),
    ("POST", "/v1/feedback"),
    ("GET", "/admin/scenarios"),
    ("GET", "/admin/scenarios/{name}"),
    ("PUT", "/admin/scenarios/{name}"),
    ("DELETE", "/admin/scenarios/{name}"),
    ("GET", "/admin/bundle"),
    ("POST", "/admin/reload"),
    ("PUT", "/admin/items"),
    ("DELETE", "/admin/items"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/playground"),
]
# Negative mode needs something to make invalid: a body or a path parameter.
NEGATABLE = {
    op for op in OPERATIONS if op[0] in ("POST", "PUT") or "{" in op[1] or op[1] == "/admin/items"
}
BOTH = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
OPS = [pytest.param(m, p, id=f"{m} {p}") for m, p in OPERATIONS]
ADMIN_OPS = [pytest.param(m, p, id=f"{m} {p}") for m, p in OPERATIONS if p.startswith("/admin/")]


def _cases(api_schema, method: str, path: str, call) -> None:
    """``call(case)`` on every case of schemathesis' coverage phase for one operation (each
    documented constraint's boundaries, e.g. a weight of exactly 1e6 and one of 1000001, -1, the
    wrong type, a missing required field), then on up to EXAMPLES random valid and EXAMPLES
    random invalid cases (its fuzzing phase)."""
    op = api_schema[path][method]
    config = api_schema.config.generation_for(operation=op)
    for case in api_schema.iter_coverage_cases(op, generation_modes=BOTH, generation_config=config):
        call(case)
    for mode in BOTH:
        if mode is GenerationMode.POSITIVE or (method, path) in NEGATABLE:
            given(op.as_strategy(generation_mode=mode))(SETTINGS(lambda case: call(case)))()


def test_every_operation_is_fuzzed(api_schema):
    found = sorted((r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations())
    assert found == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPS)
def test_fuzz_with_token(api_schema, method, path):
    """Every operation, with the admin token where one is needed."""

    def call(case):
        response = case.call_and_validate(headers=AUTH, checks=CHECKS)
        _count("with token", response.status_code)
        _extreme(case, response.status_code)

    _cases(api_schema, method, path, call)


@pytest.mark.parametrize(("method", "path"), ADMIN_OPS)
def test_fuzz_admin_without_token_changes_nothing(api_schema, admin, method, path):
    """Admin operations with the fuzzer's own (never valid) authorization header, or none: every
    one refused, and the scenarios and the loaded bundle (its load time: even a reload of the same
    bundle would show) exactly as before."""
    before = _state(admin)

    def call(case):
        response = case.call_and_validate(checks=CHECKS)
        _count("admin without token", response.status_code)
        # schemathesis' coverage phase may also send a method the path does not serve: a 405
        # is then a refusal too (and the state check below still holds)
        other_method = case.method.upper() != method.upper()
        refusals = (401, 403, 422, 405) if other_method else (401, 403, 422)
        assert response.status_code in refusals, (case.method, response.text)

    _cases(api_schema, method, path, call)
    assert _state(admin) == before


def _extreme(case, status: int) -> None:
    """Count requests whose weights lie outside [0, 1e6]; every one must have been refused."""
    body = case.body if isinstance(case.body, dict) else {}
    arms = body.get("arms") if isinstance(body.get("arms"), list) else []
    found = [body.get("weights")] + [a.get("weights") for a in arms if isinstance(a, dict)]
    for w in found:
        values = w.values() if isinstance(w, dict) else w if isinstance(w, list) else ()
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if any(v > 1e6 or v < 0 for v in nums):
            COUNTS["extreme weights sent"] = COUNTS.get("extreme weights sent", 0) + 1
            assert status == 422, (case.body, status)


def test_fuzzer_sent_extreme_weights():
    """The fuzz run above would have found unbounded weights: the schema documents [0, 1e6], so
    schemathesis' coverage phase sends 1e6 + 1 and -1 (and its fuzzing phase random values past
    them) to retrieve, batch and scenario writes, and every one was refused with 422."""
    assert COUNTS.get("extreme weights sent", 0) >= 6, COUNTS


@pytest.mark.parametrize(
    "weights",
    [[1e308, 1e308, 1e308], [1e-300, 0, 0], {"click": 1e7}, [0, 0, 5e-324], [1e6 + 1, 1, 1]],
)
def test_extreme_weights_are_a_clear_422(fuzz_server, weights):
    c = fuzz_server.client
    for path, body in (
        ("/v1/retrieve", {"user_id": "u1", "weights": weights}),
        ("/v1/retrieve/batch", {"users": [{"user_id": "u1"}], "weights": weights}),
    ):
        r = c.post(path, json=body)
        assert r.status_code == 422, r.text
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "weights"] and "scale them" in err["msg"], err
    r = c.put("/admin/scenarios/extreme", json={"weights": weights}, headers=AUTH)
    assert r.status_code == 422, r.text


def test_fuzz_figures(report, fuzz_server):
    """Runs last in this module: the figures of the fuzz run, and the server still healthy."""
    assert fuzz_server.client.get("/readyz").json()["status"] == "ok"
    assert COUNTS.get("5xx", 0) == 0
    report.add(
        "API fuzzing (schemathesis)",
        {
            "schemathesis version": schemathesis.__version__,
            "operations fuzzed": f"{len(OPERATIONS)} (every one in the OpenAPI document)",
            "cases per operation": f"coverage phase (all) + {EXAMPLES} random valid"
            f" + {EXAMPLES} random invalid",
            "requests with the admin token": COUNTS.get("with token", 0),
            "admin requests without a valid token": COUNTS.get("admin without token", 0),
            "requests with a weight outside [0, 1e6] (all answered 422)": COUNTS.get(
                "extreme weights sent", 0
            ),
            "server errors (5xx)": COUNTS.get("5xx", 0),
            "responses violating the documented schema": 0,
            "state changes without the token": 0,
        },
        "Checks on every response: not_a_server_error, status_code_conformance, "
        "content_type_conformance, response_schema_conformance, negative_data_rejection; any "
        "failure fails the test, so the zeros above are asserted, not counted after the fact. "
        "Without the token every admin call must be 401/403/422 and the scenario list and the "
        "loaded bundle (with its load time) must be unchanged afterwards.",
    )
