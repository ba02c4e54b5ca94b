"""Asking every serving replica to reload the new bundle, through its admin API.

Replicas are a list of base URLs (``--replicas``) or a DNS name answering one address per replica
(``--replicas-dns csmf-replicas:8000``: a Kubernetes headless Service, or Docker compose's service
name), resolved after the commit so a replica that starts meanwhile loads the new bundle by
itself. Each replica is asked in turn and checked to serve the new model version; one that does
not answer or refuses is reported and makes the job's exit status non-zero, but the others are
not rolled back: each replica verifies a bundle fully before swapping it in, so any replica
serves either the previous model or the new one, both verified, and the next run (or a manual
``POST /admin/reload``) brings the laggard along. CsmfModelVersionSkew fires if it stays behind.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass

from csmf.admin_client import AdminClientError, reload_bundle
from csmf.errors import CsmfError


class ReplicaError(CsmfError, ValueError):
    """The replicas cannot be found (a DNS name that does not resolve, a malformed URL)."""


@dataclass
class ReplicaResult:
    url: str
    ok: bool
    detail: str  # the model version now served, or the error

    def to_dict(self) -> dict:
        return asdict(self)


def check_urls(urls: tuple[str, ...]) -> None:
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ReplicaError(f"replica URL must start with http:// or https://, got {u!r}")


def resolve(urls: tuple[str, ...], dns: str | None) -> list[str]:
    """The replicas' base URLs: the explicit ones, then one per address of ``dns`` (HOST:PORT)."""
    out = list(urls)
    if dns:
        host, sep, port = dns.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ReplicaError(f"--replicas-dns expects HOST:PORT, got {dns!r}")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ReplicaError(f"--replicas-dns {dns}: cannot resolve {host!r}: {exc}") from None
        for addr in sorted({i[4][0] for i in infos}):
            out.append(f"http://[{addr}]:{port}" if ":" in addr else f"http://{addr}:{port}")
    return out


def reload_all(
    urls: list[str], token: str, bundle: str, model_version: str, timeout: float
) -> list[ReplicaResult]:
    """Reload ``bundle`` (the path as the replicas see it) on every replica, one at a time, and
    check each answers with ``model_version``."""
    results = []
    for url in urls:
        try:
            doc = reload_bundle(url, token, bundle, timeout=timeout)
        except AdminClientError as exc:
            results.append(ReplicaResult(url, False, str(exc)))
            continue
        got = doc.get("bundle", {}).get("model_version")
        if got != model_version:
            results.append(
                ReplicaResult(url, False, f"reloaded, but serves {got}, expected {model_version}")
            )
        else:
            results.append(ReplicaResult(url, True, got))
    return results
