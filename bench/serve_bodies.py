"""Request bodies of the serving benchmark: the mixed load, one body set per option priced, the
wrk script that cycles through them, and the bodies the parity check posts to every server."""

from __future__ import annotations

import json
import random
from pathlib import Path


def make_bodies(
    bundle: Path, n_items: int, count: int = 5000, k: int = 50, seed: int = 0
) -> list[str]:
    from csmf.bundle import UserSnapshot

    users = UserSnapshot.load(bundle / "users.parquet", "user_id").ids
    rng = random.Random(seed)
    out = []
    for n in range(count):
        b: dict = {"user_id": rng.choice(users), "k": k}
        if rng.random() < 0.1:
            b["user_id"] = f"new-user-{n}"  # unknown: cold start unless a history follows
        if rng.random() < 0.1:
            b["history"] = [f"i{rng.randrange(n_items)}" for _ in range(10)]
        if rng.random() < 0.4:
            b["weights"] = {
                o: round(rng.uniform(0, 2), 2) for o in ("exposure", "click", "conversion")
            }
        if rng.random() < 0.1:
            b["exclude"] = [f"i{rng.randrange(n_items)}" for _ in range(5)]
            b["exclude_seen"] = True
        out.append(json.dumps(b))
    return out


OPTIONS = ("plain", "explain", "exclude_seen", "exclude", "filter", "filter_narrow")
OPTION_NOTES = {
    "plain": "known users, scenario `default`, k=50, `exclude_seen: false`",
    "explain": "plain + `explain: true` (per-objective scores of every item)",
    "exclude_seen": "plain with `exclude_seen` at its default (true): the stored history "
    "(~40 items) never returned",
    "exclude": "plain + `exclude`: 5 item ids",
    "filter": "plain + `filter`: `topic in [500 topics]` (~50 % of items), 8 distinct filters "
    "(cached after first use)",
    "filter_narrow": "plain + `filter`: `topic in [50 topics]` (~5 % of items: IVF probes "
    "nprobe / 0.05 lists to see as many allowed items), 8 distinct filters",
}


def option_bodies(
    bundle: Path, n_items: int, option: str, count: int = 2000, k: int = 50, seed: int = 1
) -> list[str]:
    """Bodies that differ from the plainest request by one option, to price each option."""
    from csmf.bundle import UserSnapshot

    users = UserSnapshot.load(bundle / "users.parquet", "user_id").ids
    rng = random.Random(seed)
    topics = [str(t) for t in range(1000)]  # bench/serve_data.py: items have 1,000 topics
    share = {"filter": 500, "filter_narrow": 50}.get(option, 0)
    filters = [{"field": "topic", "in": rng.sample(topics, share)} for _ in range(8)]
    out = []
    for _ in range(count):
        b: dict = {"user_id": rng.choice(users), "k": k}
        if option != "exclude_seen":
            b["exclude_seen"] = False
        if option == "explain":
            b["explain"] = True
        elif option == "exclude":
            b["exclude"] = [f"i{rng.randrange(n_items)}" for _ in range(5)]
        elif option in ("filter", "filter_narrow"):
            b["filter"] = rng.choice(filters)
        out.append(json.dumps(b))
    return out


def write_lua(bodies: list[str], path: Path) -> Path:
    lines = ["local bodies = {"] + [f"  {json.dumps(b)}," for b in bodies] + ["}"]
    lines += [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        "local counter = 0",
        "function setup(thread)",
        '  thread:set("tid", counter)',
        "  counter = counter + 1",
        "end",
        "function init(args)",
        "  i = (tid or 0) * 1777",  # threads start at different bodies
        "end",
        "request = function()",
        "  i = i + 1",
        '  return wrk.format(nil, "/v1/retrieve", nil, bodies[(i % #bodies) + 1])',
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
