"""A Milvus read waits at most its deadline: pymilvus retries a failing call until its own
timeout has passed and then lets the last attempt run a whole timeout more, so a restarting
server (it accepts connections, answers nothing) could hold a request past any client's timeout
(csmf/index/milvus.py ``_within``)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("pymilvus")

from csmf.index.milvus import _within  # noqa: E402


def test_an_answer_within_the_deadline_is_returned():
    assert _within(5.0, lambda a, *, b: a + b, 2, b=3) == 5


def test_a_call_that_does_not_answer_is_abandoned_at_the_deadline():
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.2 s"):
        _within(0.2, release.wait, 30)
    waited = time.monotonic() - t0
    release.set()  # let the abandoned call end
    assert waited < 5.0  # the request does not wait for the call (it would wait 30 s)


def test_the_calls_own_error_reaches_the_caller():
    def refuse():
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError, match="refused"):
        _within(5.0, refuse)
