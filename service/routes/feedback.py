"""POST /v1/feedback: a click or conversion on an item a retrieve served
(docs/design.md#tune-experiment-feedback).

The request id is verified by its signature (service/request_ids.py), so any replica accepts
feedback for a request another one served; it also carries fingerprints of the items the request
returned, so feedback about any other item is refused (422). Each (request id, item, event) is
recorded once (service/feedback_once.py: across replicas with Redis, per process without); a
replay is answered 200 with ``"duplicate": true`` and neither counted nor logged. A recorded
event is counted per scenario and experiment arm (``csmf_feedback_events_total``, next to
``csmf_impressions_total`` counted at retrieve time: CTR = clicks / impressions per arm) and
appended to the event log when one is configured.
"""

from __future__ import annotations

import time

from fastapi import APIRouter

from service.deps import State
from service.errors import FieldError, UnknownRequestIdError
from service.event_log import EVENTS
from service.request_ids import NotServedError, UnknownRequestError
from service.schemas import FeedbackIn

router = APIRouter(tags=["feedback"])


@router.post(
    "/v1/feedback",
    responses={
        404: {"description": "unknown or expired request id (or not this user's)"},
        422: {"description": "invalid field, e.g. an unknown event or an item not returned"},
    },
    summary="Record a click or conversion on an item a /v1/retrieve call served",
)
def feedback(body: FeedbackIn, state: State) -> dict:
    if body.event not in EVENTS:
        raise FieldError(("event",), f"event must be one of {list(EVENTS)}, got {body.event!r}")
    ids = state.outcomes.request_ids
    try:
        served = ids.verify(body.request_id, body.user_id, body.item_id)
    except UnknownRequestError as exc:
        raise UnknownRequestIdError(str(exc)) from None
    except NotServedError as exc:
        raise FieldError(("item_id",), str(exc)) from None
    out = {"recorded": body.event, "scenario": served.scenario, "arm": served.arm}
    lifetime = ids.ttl_s - (time.time() - served.ms / 1000)  # the id's remaining validity
    first = state.outcomes.feedback(served, body.user_id, body.item_id, body.event, lifetime)
    return {**out, "duplicate": not first}
