"""Request ids that carry what feedback needs, signed, so no replica has to remember them.

``v1.<id>.<ms>.<scenario>.<arm>.<mac>``: a random 63-bit id (the ``request_id`` column of the
event log), the serve time in Unix ms, the scenario and arm (base64url, empty = none) and an
HMAC-SHA256 over all of them *and the user id*, truncated to 128 bits. Any replica holding the key
verifies an id from any other without shared state; a forged, altered or other user's id fails.
The key is ``CSMF_FEEDBACK_KEY``, else derived from ``CSMF_ADMIN_TOKEN``, else random per process
(then feedback must reach the process that served — set a key with several workers or replicas).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache

VERSION = "v1"


@dataclass(frozen=True)
class Served:
    id: int
    ms: int
    scenario: str | None
    arm: str | None


class UnknownRequestError(ValueError):
    """The id was not issued by this service (or not for this user), or it expired."""


@lru_cache(maxsize=4096)  # scenario and arm names repeat: encode each once
def _b64(s: str | None) -> str:
    return "" if s is None else base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def _unb64(s: str) -> str | None:
    if not s:
        return None
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


def key_from(feedback_key: str | None, admin_token: str | None) -> bytes:
    if feedback_key:
        return feedback_key.encode()
    if admin_token:
        return hmac.new(admin_token.encode(), b"csmf feedback request ids", "sha256").digest()
    return secrets.token_bytes(32)


class RequestIds:
    def __init__(self, key: bytes, ttl_s: float) -> None:
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)  # keyed once, copied per id
        self.ttl_s = ttl_s

    def _mac(self, body: str, user_id: str | None) -> str:
        h = self._hmac.copy()
        h.update(f"{body}\x00{user_id or ''}".encode())
        return h.hexdigest()[:32]

    def issue(self, user_id: str | None, scenario: str | None, arm: str | None) -> tuple[str, int]:
        rid = secrets.randbits(63)
        body = f"{VERSION}.{rid:x}.{int(time.time() * 1000):x}.{_b64(scenario)}.{_b64(arm)}"
        return f"{body}.{self._mac(body, user_id)}", rid

    def verify(self, token: str, user_id: str) -> Served:
        parts = token.split(".")
        unknown = UnknownRequestError(
            f"unknown request id {token[:120]!r} for user {user_id!r}: send the request_id of a "
            "/v1/retrieve response for this user"
        )
        if len(parts) != 6 or parts[0] != VERSION:
            raise unknown
        body = ".".join(parts[:5])
        if not hmac.compare_digest(self._mac(body, user_id), parts[5]):
            raise unknown
        try:
            served = Served(
                int(parts[1], 16), int(parts[2], 16), _unb64(parts[3]), _unb64(parts[4])
            )
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise unknown from None
        age = time.time() - served.ms / 1000
        if age > self.ttl_s:
            raise UnknownRequestError(
                f"request id {token[:120]!r} expired: served {age:.0f}s ago, feedback is accepted "
                f"for {self.ttl_s:.0f}s (CSMF_FEEDBACK_TTL_S)"
            )
        return served
