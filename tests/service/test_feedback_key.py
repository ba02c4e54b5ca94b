"""The key signing request ids (service/feedback_key.py) is never derived from the admin token:
rotating the token keeps every outstanding request id valid. Without CSMF_FEEDBACK_KEY it is
created once — in Redis for every replica on it, else beside the scenarios file for the workers
of one server — and kept across restarts."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor

from fixtures.services import REDIS_URL

from service.feedback_key import KEY_FILE, file_key


def _served(client) -> dict:
    r = client.post("/v1/retrieve", json={"user_id": "u1", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    return {
        "request_id": body["request_id"],
        "user_id": "u1",
        "item_id": body["items"][0]["item_id"],
    }


def _feedback(client, served: dict):
    return client.post("/v1/feedback", json={**served, "event": "click"})


def test_rotating_the_admin_token_keeps_outstanding_request_ids(bundles, make_client, tmp_path):
    served = _served(make_client(bundles["flat"], admin_token="old-token"))
    restarted = make_client(bundles["flat"], admin_token="new-token")  # same scenarios folder
    r = _feedback(restarted, served)
    assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(bytes.fromhex(key.read_text())) == 32


def test_a_configured_key_wins_and_another_key_refuses(bundles, make_client, tmp_path):
    served = _served(make_client(bundles["flat"], feedback_key="k1"))
    assert not (tmp_path / KEY_FILE).exists()
    assert _feedback(make_client(bundles["flat"], feedback_key="k1"), served).status_code == 200
    assert _feedback(make_client(bundles["flat"], feedback_key="k2"), served).status_code == 404


def test_racing_workers_agree_on_one_key_file(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: file_key(tmp_path / "k" / KEY_FILE), range(32)))
    assert len(keys) == 1 and [p.name for p in (tmp_path / "k").iterdir()] == [KEY_FILE]


def test_replicas_on_one_redis_share_the_key(bundles, make_client, tmp_path, redis_prefix):
    kw = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    a = make_client(bundles["flat"], scenarios_file=tmp_path / "a" / "s.json", **kw)
    b = make_client(
        bundles["flat"], scenarios_file=tmp_path / "b" / "s.json", admin_token="t2", **kw
    )
    assert _feedback(b, _served(a)).status_code == 200
    assert not (tmp_path / "a" / KEY_FILE).exists()  # the key lives in Redis
