"""/metrics is unauthenticated: CSMF_METRICS_SCENARIO_LABELS decides whether scenario names
appear in it (name), only as a stable hash (hash), or not at all (none)."""

from __future__ import annotations

import hashlib

import pytest
from fixtures.services import AUTH
from prometheus_client.parser import text_string_to_metric_families

SECRET = "campaign-black-friday"


def _scrape(client) -> tuple[str, dict]:
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return text, fams


def _scenario_labels(fams, name) -> set[str]:
    return {s.labels["scenario"] for s in fams[name].samples if "scenario" in s.labels}


@pytest.mark.parametrize("mode", ["name", "hash", "none"])
def test_scenario_label_modes(bundles, make_client, mode):
    client = make_client(bundles["flat"], metrics_scenario_labels=mode)
    r = client.put(f"/admin/scenarios/{SECRET}", json={"weights": [1, 2, 3]}, headers=AUTH)
    assert r.status_code == 200
    for body in ({"scenario": SECRET}, {"weights": [1, 0, 0]}, {}):
        assert (
            client.post("/v1/retrieve", json={"user_id": "u1", "k": 3, **body}).status_code == 200
        )
    text, fams = _scrape(client)
    requests = _scenario_labels(fams, "csmf_retrieve_requests")
    weights = _scenario_labels(fams, "csmf_scenario_weight")
    hashed = "h-" + hashlib.sha256(SECRET.encode()).hexdigest()[:10]
    if mode == "name":
        assert {SECRET, "default", "_explicit"} <= requests and SECRET in weights
    else:
        assert SECRET not in text  # the name appears nowhere in the exposition
    if mode == "hash":
        assert {hashed, "_explicit"} <= requests and hashed in weights
        assert "h-" + hashlib.sha256(b"default").hexdigest()[:10] in requests
    if mode == "none":
        assert requests == {"_named", "_explicit"} and weights == set()


def test_bad_mode_is_a_settings_error(bundles, tmp_path):
    from fixtures.services import settings_for
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="metrics_scenario_labels"):
        settings_for(bundles["flat"], tmp_path, metrics_scenario_labels="names")
