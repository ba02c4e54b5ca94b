"""The key that signs request ids (docs/design.md#tune-experiment-feedback), independent of the admin
token: rotating ``CSMF_ADMIN_TOKEN`` leaves every outstanding request id valid.

Where it comes from, first match:

1. ``CSMF_FEEDBACK_KEY``: set it to rotate the key deliberately, or for replicas that share
   neither a Redis nor a disk.
2. With ``CSMF_REDIS_URL``: a random 256-bit key created once in Redis (``{prefix}feedback:key``,
   ``SET NX``), shared by every worker and replica on that Redis. (A Redis that loses its data
   gets a new key on the next process start: run it with persistence, as deploy/ does, or set 1.)
3. Otherwise: a random key created once in ``feedback.key`` beside the embedded scenarios file
   (mode 0600), shared by the workers of one server and kept across restarts.

If the place of 2 or 3 cannot be used (Redis down at startup, a read-only disk), the process falls
back to the next one, or to a key of its own, with a warning: its request ids are then verified
only where that key is known.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import uuid
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("csmf.service")
KEY_FILE = "feedback.key"


def signing_key(settings: Settings) -> bytes:
    if settings.feedback_key is not None:
        return settings.feedback_key.get_secret_value().encode()
    if settings.redis_url:
        try:
            return _redis_key(settings)
        except Exception as exc:  # any Redis failure: the service must start all the same
            log.warning(
                "feedback key: Redis unavailable (%s: %s); using the key file instead, so "
                "request ids from this process verify only on this host",
                type(exc).__name__,
                exc,
            )
    path = settings.scenarios_file.parent / KEY_FILE
    try:
        return file_key(path)
    except OSError as exc:
        log.warning(
            "feedback key: cannot use %s (%s); using a key of this process only, so feedback "
            "must reach the process that served (set CSMF_FEEDBACK_KEY)",
            path,
            exc,
        )
        return secrets.token_bytes(32)


def _redis_key(settings: Settings) -> bytes:
    from service.weight_store import redis_client

    client = redis_client(settings.redis_url, settings.redis_timeout_s)
    try:
        key = f"{settings.redis_prefix}feedback:key"
        client.set(key, secrets.token_hex(32), nx=True)  # the first process to ask creates it
        return bytes.fromhex(client.get(key))
    finally:
        client.close()


def file_key(path: Path) -> bytes:
    """The key in ``path``, created (complete, mode 0600) by whichever process asks first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # a racing worker was first: its key
                os.link(tmp, path)  # atomic create-if-absent, complete when it appears
        finally:
            tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())
