"""POST /v1/feedback: a click or conversion on an item a retrieve served
(docs/design.md#tune-experiment-feedback).

The request id is verified by its signature (service/request_ids.py), so any replica accepts
feedback for a request another one served. The event is counted per scenario and experiment arm
(``csmf_feedback_events_total``, next to ``csmf_impressions_total`` counted at retrieve time:
CTR = clicks / impressions per arm) and appended to the event log when one is configured.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import State
from service.errors import FieldError, UnknownRequestIdError
from service.event_log import EVENTS
from service.metrics import NO_ARM, scenario_label
from service.request_ids import UnknownRequestError
from service.schemas import FeedbackIn

router = APIRouter(tags=["feedback"])


@router.post(
    "/v1/feedback",
    responses={
        404: {"description": "unknown or expired request id (or not this user's)"},
        422: {"description": "invalid field, e.g. an unknown event"},
    },
    summary="Record a click or conversion on an item a /v1/retrieve call served",
)
def feedback(body: FeedbackIn, state: State) -> dict:
    if body.event not in EVENTS:
        raise FieldError(("event",), f"event must be one of {list(EVENTS)}, got {body.event!r}")
    try:
        served = state.request_ids.verify(body.request_id, body.user_id)
    except UnknownRequestError as exc:
        raise UnknownRequestIdError(str(exc)) from None
    mode = state.metrics.scenario_labels
    arm = NO_ARM if served.arm is None else scenario_label(served.arm, mode)
    state.metrics.feedback_total.labels(
        scenario_label(served.scenario, mode), arm, body.event
    ).inc()
    if state.event_log is not None:
        state.event_log.feedback(served.id, body.user_id, body.item_id, body.event)
    return {"recorded": body.event, "scenario": served.scenario, "arm": served.arm}
