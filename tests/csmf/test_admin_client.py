"""csmf/admin_client.py and csmf/names.py: what `csmf tune --apply` needs of the admin API. A name
is validated (whole string) and escaped before it goes into a URL, and a write is a
compare-and-set on the version read before the work: a concurrent admin write is refused with
a clear error, never silently overwritten."""

from __future__ import annotations

import pytest
from fixtures.services import AUTH, TOKEN

from csmf.admin_client import (
    AdminClientError,
    put_scenario,
    reload_bundle,
    scenario_url,
    scenario_version,
)
from csmf.names import is_name

BODY = {"weights": {"exposure": 1.0, "click": 2.0, "conversion": 3.0}, "description": "tune"}


@pytest.mark.parametrize(
    "name", ["x?y=1", "a/b", "ctl\n", "", "-x", "é", "x" * 65, "a b", "..", None]
)
def test_names_that_are_not_scenario_names_never_reach_a_url(name):
    assert not is_name(name)
    with pytest.raises(AdminClientError, match="must be 1-64 characters"):
        scenario_url("http://127.0.0.1:1", name)


def test_valid_names_are_escaped_all_the_same():
    assert is_name("promo_2.v-1")
    assert scenario_url("http://h:1/", "promo_2.v-1") == "http://h:1/admin/scenarios/promo_2.v-1"


def test_put_is_a_compare_and_set_on_the_version_read(bundles, make_client):
    c = make_client(bundles["flat"])
    url = str(c.base_url)
    assert scenario_version(url, TOKEN, "homepage", client=c) == 0  # absent
    read = scenario_version(url, TOKEN, "homepage", client=c)
    r = c.put("/admin/scenarios/homepage", json={"weights": [1, 1, 1]}, headers=AUTH)  # admin
    assert r.status_code == 200
    with pytest.raises(AdminClientError, match="changed on the service .* nothing was written"):
        put_scenario(url, TOKEN, "homepage", BODY, read, client=c)
    assert c.get("/admin/scenarios/homepage", headers=AUTH).json()["weights"]["click"] == 1.0
    now = scenario_version(url, TOKEN, "homepage", client=c)
    s = put_scenario(url, TOKEN, "homepage", BODY, now, client=c)
    assert s["weights"]["conversion"] == 3.0 and s["version"] == now + 1
    r = c.put("/admin/scenarios/homepage", json={**BODY, "expected_version": now}, headers=AUTH)
    assert r.status_code == 409 and "is at version" in r.json()["detail"]


def test_unreachable_service_is_one_clear_error():
    with pytest.raises(AdminClientError, match="cannot reach the service"):
        scenario_version("http://127.0.0.1:1", TOKEN, "x", timeout=0.5)


def test_reload_swaps_the_bundle_and_a_refusal_names_the_replica(bundles, make_client):
    c = make_client(bundles["flat"])
    url = str(c.base_url)
    before = c.get("/admin/bundle", headers=AUTH).json()["model_version"]
    with pytest.raises(AdminClientError, match=f"service at {url} refused to reload .*HTTP 422"):
        reload_bundle(url, TOKEN, "/nonexistent/bundle", client=c)
    assert c.get("/admin/bundle", headers=AUTH).json()["model_version"] == before
    with pytest.raises(AdminClientError, match="HTTP 403"):
        reload_bundle(url, "wrong-token", str(bundles["other"]), client=c)
    doc = reload_bundle(url, TOKEN, str(bundles["other"]), client=c)
    assert doc["previous"] == before and doc["bundle"]["model_version"] != before
    assert (
        c.get("/admin/bundle", headers=AUTH).json()["model_version"]
        == doc["bundle"]["model_version"]
    )
    with pytest.raises(AdminClientError, match="cannot reach the service"):
        reload_bundle("http://127.0.0.1:1", TOKEN, str(bundles["flat"]), timeout=0.5)
