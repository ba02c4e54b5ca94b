"""A small client of the service's admin API, for tools: scenario writes (``csmf tune --apply``)
and bundle reloads (``csmf daily``). A scenario name is validated and escaped before it goes into
a URL, and a write is a compare-and-set on the version read before it, so a concurrent admin write
is reported, never silently overwritten (docs/design.md#tune-experiment-feedback).

    version = scenario_version(url, token, "homepage")  # when the work starts
    ...                                                 # the work (minutes)
    put_scenario(url, token, "homepage", {"weights": ...}, version)  # AdminClientError if changed
    reload_bundle(url, token, "/models/bundles/20261206T030000Z")   # the replica's new bundle
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from csmf.errors import CsmfError
from csmf.names import NAME_RULE, is_name


class AdminClientError(CsmfError, ValueError):
    """An invalid scenario name, an unreachable service, a refused or conflicting write."""


def scenario_url(base_url: str, name: str) -> str:
    """``{base_url}/admin/scenarios/{name}`` for a valid scenario name (escaped all the same)."""
    if not is_name(name):
        raise AdminClientError(f"scenario name {name!r} must be {NAME_RULE}")
    return f"{base_url.rstrip('/')}/admin/scenarios/{quote(name, safe='')}"


def _call(method: str, base_url: str, name: str, token: str, client, timeout: float, **kw):
    import httpx

    url = scenario_url(base_url, name)
    headers = {"authorization": f"Bearer {token}"}
    try:
        if client is not None:
            return client.request(method, url, headers=headers, **kw)  # the client's timeout
        return httpx.request(method, url, headers=headers, timeout=timeout, **kw)
    except httpx.HTTPError as exc:
        raise AdminClientError(
            f"cannot reach the service at {base_url}: {type(exc).__name__}: {exc}"
        ) from None


def scenario_version(
    base_url: str, token: str, name: str, client=None, timeout: float = 10.0
) -> int:
    """The scenario's current version, 0 if it does not exist."""
    r = _call("GET", base_url, name, token, client, timeout)
    if r.status_code == 404:
        return 0
    if r.status_code != 200:
        raise AdminClientError(
            f"service at {base_url} refused to read scenario {name!r}: "
            f"HTTP {r.status_code} {r.text[:300]}"
        )
    return int(r.json()["version"])


def put_scenario(
    base_url: str,
    token: str,
    name: str,
    body: dict[str, Any],
    expected_version: int | None,
    client=None,
    timeout: float = 10.0,
) -> dict:
    """PUT ``body`` as scenario ``name`` if it is still at ``expected_version`` (0: absent; None:
    unconditionally). Returns the stored scenario; AdminClientError on a conflict or refusal."""
    doc = dict(body) if expected_version is None else {**body, "expected_version": expected_version}
    r = _call("PUT", base_url, name, token, client, timeout, json=doc)
    if r.status_code == 409:
        raise AdminClientError(
            f"scenario {name!r} changed on the service at {base_url} since it was read; nothing "
            f"was written ({r.json().get('detail', r.text[:300])})"
        )
    if r.status_code != 200:
        raise AdminClientError(
            f"service at {base_url} refused scenario {name!r}: HTTP {r.status_code} {r.text[:300]}"
        )
    return r.json()


def reload_bundle(
    base_url: str, token: str, bundle: str, client=None, timeout: float = 300.0
) -> dict:
    """``POST /admin/reload {"bundle": bundle}`` on one replica (``bundle`` is the path as the
    replica sees it). Returns the replica's answer (``previous`` and ``bundle`` with its
    ``model_version``); AdminClientError naming the replica and the reason when it is unreachable
    or refuses (it then keeps serving its previous bundle). ``timeout``: loading and verifying a
    large bundle takes a while."""
    import httpx

    url = f"{base_url.rstrip('/')}/admin/reload"
    headers = {"authorization": f"Bearer {token}"}
    try:
        if client is not None:
            r = client.post(url, headers=headers, json={"bundle": bundle})
        else:
            r = httpx.post(url, headers=headers, json={"bundle": bundle}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise AdminClientError(
            f"cannot reach the service at {base_url}: {type(exc).__name__}: {exc}"
        ) from None
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text[:300])
        except ValueError:
            detail = r.text[:300]
        raise AdminClientError(
            f"service at {base_url} refused to reload {bundle}: HTTP {r.status_code} {detail}"
        )
    return r.json()
