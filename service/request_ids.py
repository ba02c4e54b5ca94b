"""Request ids that carry what feedback needs, signed, so no replica has to remember them.

``v2.<id>.<ms>.<scenario>.<arm>.<items>.<mac>``: a random 63-bit id (the ``request_id`` column of
the event log), the serve time in Unix ms, the scenario and arm (base64url, empty = none), the
CRC-32 of every item id the request returned (4 bytes each, base64url: feedback is accepted only
for those items; another item passes with probability k / 2^32) and an HMAC-SHA256 over all of
them *and the user id*, truncated to 128 bits. Any replica holding the key
verifies an id from any other without shared state; a forged, altered or other user's id fails.
Where the key comes from (never from the admin token, so rotating that voids no id):
service/feedback_key.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VERSION = "v2"


@dataclass(frozen=True)
class Served:
    id: int
    ms: int
    scenario: str | None
    arm: str | None


class UnknownRequestError(ValueError):
    """The id was not issued by this service (or not for this user), or it expired."""


class NotServedError(ValueError):
    """The request did not return the item the feedback is about."""


def item_fingerprints(item_ids: Sequence[str]) -> np.ndarray:
    """(N,) big-endian uint32 CRC-32 of each item id: a request's slice of it goes into its id
    (computed once per bundle, so a request only gathers its rows)."""
    return np.fromiter((zlib.crc32(i.encode()) for i in item_ids), ">u4", len(item_ids))


@lru_cache(maxsize=4096)  # scenario and arm names repeat: encode each once
def _b64(s: str | None) -> str:
    return "" if s is None else base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def _unb64(s: str) -> str | None:
    if not s:
        return None
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


_BLOCK = 64  # SHA-256's block size


class _RandomIds:
    """63-bit ids from the OS's CSPRNG, read 4 KiB at a time (one system call per 512 ids, not
    one per id); a forked child drops the parent's buffer so no two processes share ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the loop thread and batch threads draw ids
        self._buf, self._pos = b"", 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._lock = threading.Lock()
        self._buf, self._pos = b"", 0

    def next(self) -> int:
        with self._lock:
            pos = self._pos
            if pos >= len(self._buf):
                self._buf, pos = secrets.token_bytes(4096), 0
            self._pos = pos + 8
            return int.from_bytes(self._buf[pos : pos + 8], "little") >> 1


_random_ids = _RandomIds()


class RequestIds:
    def __init__(self, key: bytes, ttl_s: float) -> None:
        # HMAC-SHA256 (RFC 2104) from its two keyed hash states, each copied per id: the same MAC
        # as hmac.new(key, msg, "sha256") at half the cost of copying an hmac object.
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._ids = _random_ids
        self.ttl_s = ttl_s

    def _mac(self, body: str, user_id: str | None) -> str:
        inner = self._inner.copy()
        # a history-only request (no user) signs differently from any user id, "" included
        inner.update(
            f"{body}\x00{user_id}".encode() if user_id is not None else f"{body}\x01".encode()
        )
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:32]

    def issue(
        self, user_id: str | None, scenario: str | None, arm: str | None, items: bytes = b""
    ) -> tuple[str, int]:
        """(token, id) for a request that returned the items whose fingerprints are ``items``
        (:func:`item_fingerprints` of its rows, as bytes)."""
        rid = self._ids.next()
        fps = base64.urlsafe_b64encode(items).rstrip(b"=").decode()
        body = (
            f"{VERSION}.{rid:x}.{time.time_ns() // 1_000_000:x}.{_b64(scenario)}.{_b64(arm)}.{fps}"
        )
        return f"{body}.{self._mac(body, user_id)}", rid

    def verify(self, token: str, user_id: str | None, item_id: str | None = None) -> Served:
        """The request ``token`` names, if it was issued for ``user_id`` (None: a history-only
        request) and is not expired; with ``item_id``, also that the request returned it."""
        parts = token.split(".")
        unknown = UnknownRequestError(
            f"unknown request id {token[:120]!r} for user {user_id!r}: send the request_id of a "
            "/v1/retrieve response for this user"
        )
        if len(parts) != 7 or parts[0] != VERSION:
            raise unknown
        body = ".".join(parts[:6])
        if not hmac.compare_digest(self._mac(body, user_id), parts[6]):
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
        if item_id is not None:
            fps = base64.urlsafe_b64decode(parts[5] + "=" * (-len(parts[5]) % 4))
            mine = zlib.crc32(item_id.encode()).to_bytes(4, "big")
            if not any(fps[i : i + 4] == mine for i in range(0, len(fps), 4)):
                raise NotServedError(
                    f"item_id {item_id[:120]!r} is not one of the {len(fps) // 4} items request "
                    f"{token[:40]!r}... returned; feedback is accepted only for those"
                )
        return served
