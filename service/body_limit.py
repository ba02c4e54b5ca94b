"""The one request-body limit of every route (``CSMF_MAX_BODY_BYTES``), at the ASGI level
(docs/design.md#the-request-path).

:func:`read_body` reads a request's whole body from ASGI messages before anything else looks at
the request — before routing, authentication or parsing — and refuses it with
:class:`~service.errors.PayloadTooLargeError` (413) as soon as the declared content-length or the
bytes received so far pass the limit, so a chunked body without a content-length is cut off after
``limit`` bytes too. The server never holds more than ``limit`` bytes of one body; uvicorn stops
reading the socket while the application does not ask for more (its flow control), so the rest of
an oversized body stays in the client's send buffer until the connection closes.

The bytes go to the retrieve fast path directly; every other route gets them from
:func:`replay`, a ``receive`` that hands the body over once and then passes through to the
server's (for disconnect notices).
"""

from __future__ import annotations

from service.errors import PayloadTooLargeError

SETTING = "CSMF_MAX_BODY_BYTES"


class Disconnected(Exception):  # noqa: N818 (a signal, not an error: the client went away)
    """The client closed the connection before its body was complete; nothing to answer."""


def declared_too_large(scope, limit: int) -> PayloadTooLargeError | None:
    """The 413 error if the request's content-length is over ``limit``, else None."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return PayloadTooLargeError(
                f"request body is {int(value)} bytes, the limit is {limit} bytes ({SETTING})"
            )
    return None


async def read_body(scope, receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes whether or not it declared a length
    (PayloadTooLargeError), or :class:`Disconnected` if the client went away."""
    too_large = declared_too_large(scope, limit)
    if too_large is not None:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(
                f"request body exceeds the limit of {limit} bytes ({SETTING})"
            )
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that returns ``body`` as the whole request once, then defers to ``receive``
    (which reports the disconnect when the client goes)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again():
        return pending.pop() if pending else await receive()

    return receive_again
