"""Experiment arms: admin validation (clear 422s), stored and shared through both weight stores,
sticky assignment by (scenario, user) close to the shares over 10,000 users on a real server."""

from __future__ import annotations

import httpx
import pytest
from fixtures.services import AUTH, REDIS_URL, wait_until

from service.experiments import Arm, assign
from service.weight_store import FileWeightStore, RedisWeightStore

OBJ = ("exposure", "click", "conversion")
ARMS = [
    {"name": "control", "weights": [1, 1.8, 1.2], "share": 0.7},
    {"name": "more-conv", "weights": {"conversion": 3}, "share": 0.2},
    {"name": "clicks", "weights": [0, 1, 0], "share": 0.1},
]


@pytest.mark.parametrize(
    ("arms", "loc", "message"),
    [
        ([], ["body", "arms"], "an experiment needs 1..16 arms, got 0"),
        ([{**ARMS[0], "share": 0.5}, ARMS[1]], ["body", "arms"], "arm shares must sum to 1"),
        ([{**ARMS[0], "share": 0.8}, {**ARMS[0], "share": 0.2}], ["body", "arms"],
         "arm names must be unique, 'control' appears twice"),
        ([{**ARMS[0], "share": 1.0}, {**ARMS[1], "share": 0.0}], ["body", "arms"],
         "share of arm 'more-conv' must be in (0, 1], got 0.0"),
        ([{**ARMS[0], "share": 1.0, "name": "bad name"}], ["body", "arms"], "arm name 'bad name'"),
        ([{**ARMS[0], "share": 1.0, "name": "ctl\n"}], ["body", "arms"], "arm name 'ctl\\n'"),
        ([{**ARMS[0], "share": 1.0, "weights": [0, 0, 0]}], ["body", "arms", 0, "weights"],
         "weights must not all be zero"),
        ([{**ARMS[0], "share": 1.0, "weights": {"buy": 1}}], ["body", "arms", 0, "weights"],
         "unknown objective(s) ['buy']"),
    ],
)  # fmt: skip
def test_bad_arms_are_422_naming_the_problem(bundles, make_client, arms, loc, message):
    c = make_client(bundles["flat"])
    r = c.put("/admin/scenarios/exp", json={"arms": arms}, headers=AUTH)
    assert r.status_code == 422, r.text
    err = r.json()["detail"][0]
    assert err["loc"] == loc and message in err["msg"], err
    assert c.get("/admin/scenarios/exp", headers=AUTH).status_code == 404  # nothing stored


def test_shares_within_1e9_are_accepted_and_weights_xor_arms(bundles, make_client):
    c = make_client(bundles["flat"])
    thirds = [{"name": f"a{i}", "weights": [1, 1, 1], "share": 1 / 3} for i in range(3)]
    assert c.put("/admin/scenarios/e", json={"arms": thirds}, headers=AUTH).status_code == 200
    both = {"weights": [1, 1, 1], "arms": thirds}
    r = c.put("/admin/scenarios/e", json=both, headers=AUTH)
    assert r.status_code == 422 and "exactly one of `weights` or `arms`" in r.text
    r = c.put("/admin/scenarios/e", json={"description": "x"}, headers=AUTH)
    assert r.status_code == 422 and "exactly one of `weights` or `arms`" in r.text


def test_a_scenario_name_with_a_trailing_newline_is_refused(bundles, make_client):
    c = make_client(bundles["flat"])
    r = c.put("/admin/scenarios/ctl%0A", json={"weights": [1, 1, 1]}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "name"], r.text
    assert "ctl" not in c.get("/admin/scenarios", headers=AUTH).text


def _arms(*shares) -> tuple[Arm, ...]:
    return tuple(Arm(f"a{i}", {"click": 1.0}, s) for i, s in enumerate(shares))


def test_arms_round_trip_through_the_file_store(tmp_path):
    a, b = (
        FileWeightStore(tmp_path / "s.json", OBJ, 0.05),
        FileWeightStore(tmp_path / "s.json", OBJ, 0.05),
    )
    a.start(), b.start()
    try:
        a.put("e", {"click": 1.0}, "exp", _arms(0.25, 0.75))
        wait_until(lambda: "e" in b.scenarios, 2.0, "the other worker to see the experiment")
        assert b.get("e").arms == _arms(0.25, 0.75) and b.get("e").version == 1
        a.put("e", {"click": 1.0}, "plain")  # replacing an experiment by one triplet ends it
        wait_until(lambda: b.get("e").version == 2, 2.0, "v2")
        assert b.get("e").arms == ()
    finally:
        a.stop(), b.stop()


def test_arms_are_shared_and_versioned_through_redis(redis_prefix):
    a = RedisWeightStore(REDIS_URL, redis_prefix, OBJ, 0.1, 0.5)
    b = RedisWeightStore(REDIS_URL, redis_prefix, OBJ, 0.1, 0.5)
    a.start(), b.start()
    try:
        assert a.wait_synced(3) and b.wait_synced(3)
        s1 = a.put("e", {"click": 1.0}, "exp", _arms(0.5, 0.5))
        wait_until(lambda: "e" in b.scenarios, 2.0, "replica b to see the experiment")
        assert b.get("e").arms == _arms(0.5, 0.5)
        s2 = b.put("e", {"click": 1.0}, "exp", _arms(0.9, 0.1))
        assert s2.version > s1.version
        wait_until(lambda: a.get("e").arms == _arms(0.9, 0.1), 2.0, "replica a to see v2")
    finally:
        a.stop(), b.stop()


@pytest.mark.slow
def test_assignment_is_sticky_and_close_to_the_shares_on_a_real_server(bundles, serve):
    svc = serve(bundles["flat"])
    r = svc.client.put("/admin/scenarios/exp", json={"arms": ARMS}, headers=AUTH)
    assert r.status_code == 200 and [a["name"] for a in r.json()["arms"]] == [
        "control", "more-conv", "clicks"
    ]  # fmt: skip
    users = [f"user-{i}" for i in range(10_000)]
    got: dict[str, str] = {}
    for lo in range(0, len(users), 1000):
        body = {"users": [{"user_id": u} for u in users[lo : lo + 1000]], "k": 1, "scenario": "exp"}
        res = svc.client.post("/v1/retrieve/batch", json=body)
        assert res.status_code == 200, res.text
        got.update({x["user_id"]: x["arm"] for x in res.json()["results"]})
        assert res.json()["weights"] == {"exposure": 1.0, "click": 1.8, "conversion": 1.2}
        for x in res.json()["results"][:30]:  # each result carries its arm's weights
            want = next(a for a in ARMS if a["name"] == x["arm"])["weights"]
            w = x["weights"]
            if isinstance(want, list):
                assert [w[o] for o in OBJ] == pytest.approx(want)
            else:
                assert w == pytest.approx({o: float(want.get(o, 0.0)) for o in OBJ})
    counts = {a["name"]: sum(v == a["name"] for v in got.values()) for a in ARMS}
    for a in ARMS:
        assert abs(counts[a["name"]] / len(users) - a["share"]) < 0.02, counts
    # sticky: single requests, a second look, and the pure function agree with the batch
    arms = tuple(Arm(a["name"], {}, a["share"]) for a in ARMS)
    for u in users[:200]:
        assert assign("exp", u, arms).name == got[u]
    for u in users[:20]:
        one = svc.client.post("/v1/retrieve", json={"user_id": u, "scenario": "exp", "k": 2})
        assert one.json()["arm"] == got[u]
        want = next(a for a in ARMS if a["name"] == got[u])["weights"]
        w = one.json()["weights"]
        if isinstance(want, list):
            assert [w[o] for o in OBJ] == pytest.approx(want)
        else:
            assert w == pytest.approx({o: float(want.get(o, 0.0)) for o in OBJ})
    # a plain scenario serves no arm
    plain = svc.client.post("/v1/retrieve", json={"user_id": "u1", "k": 1}).json()
    assert plain["arm"] is None and plain["request_id"].startswith("v2.")
    assert httpx.get(f"{svc.url}/readyz").status_code == 200


def test_a_batch_counts_each_arms_impressions_and_names_each_users_arm(bundles, make_client):
    """The batch route counts impressions once per arm: the counter of each arm equals the items
    returned to that arm's users, and a batch outside experiments counts under arm `_none`."""
    from prometheus_client.parser import text_string_to_metric_families

    def impressions(text: str) -> dict[tuple[str, str], float]:
        return {
            (s.labels["scenario"], s.labels["arm"]): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "csmf_impressions_total"
        }

    c = make_client(bundles["flat"])
    assert c.put("/admin/scenarios/exp", json={"arms": ARMS}, headers=AUTH).status_code == 200
    users = [{"user_id": f"u{i}"} for i in range(40)] + [{"history": ["i1", "i2"]}]
    r = c.post("/v1/retrieve/batch", json={"users": users, "scenario": "exp", "k": 3})
    assert r.status_code == 200, r.text
    served: dict[str, int] = {}
    for res in r.json()["results"]:
        assert res["arm"] in {a["name"] for a in ARMS}
        served[res["arm"]] = served.get(res["arm"], 0) + len(res["items"])
    assert len(served) >= 2  # 41 users over shares 0.7 / 0.2 / 0.1
    r = c.post("/v1/retrieve/batch", json={"users": users[:5], "k": 4})
    assert r.status_code == 200 and all(res["arm"] is None for res in r.json()["results"])
    counted = impressions(c.get("/metrics").text)
    assert {arm: counted[("exp", arm)] for arm in served} == served
    assert counted[("default", "_none")] == sum(len(x["items"]) for x in r.json()["results"])


def test_a_batch_reads_its_scenario_once_while_arms_are_removed(bundles, make_client):
    """An admin write that removes the arms right after the batch read its scenario (here: on
    that very read) neither fails the batch nor mixes the two versions: every user gets an arm of
    the version read."""
    c = make_client(bundles["flat"])
    assert c.put("/admin/scenarios/exp", json={"arms": ARMS}, headers=AUTH).status_code == 200
    store = c.app.state.csmf.scenarios.store
    read = store.get

    def get_then_remove_arms(name):
        s = read(name)
        if name == "exp" and s.arms:
            store.put("exp", {"exposure": 1.0, "click": 1.0, "conversion": 1.0}, "no more arms")
        return s

    store.get = get_then_remove_arms
    try:
        users = [{"user_id": f"u{i}"} for i in range(20)]
        r = c.post("/v1/retrieve/batch", json={"users": users, "scenario": "exp", "k": 3})
    finally:
        store.get = read
    assert r.status_code == 200, r.text
    assert {res["arm"] for res in r.json()["results"]} <= {a["name"] for a in ARMS}
    assert r.json()["weights"] == {"exposure": 1.0, "click": 1.8, "conversion": 1.2}  # arm 0
    assert c.get("/admin/scenarios/exp", headers=AUTH).json()["arms"] is None  # the write held
