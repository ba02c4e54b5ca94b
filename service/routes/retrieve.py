"""POST /v1/retrieve and /v1/retrieve/batch.

Both routes parse their bodies themselves — the single one with ``service.fast_parse`` (orjson
and exact checks, pydantic's parser for anything else), the batch with pydantic's Rust JSON
parser (``model_validate_json``) — and return pre-serialised bytes, skipping FastAPI's
``json.loads`` → validate → ``jsonable_encoder`` round trips (~40 µs of ~90 µs per single request
measured here; 10 % of a 500-user batch). Their OpenAPI request schemas are declared from the
same models. Retrieval runs on the event loop thread itself (FAISS with one OpenMP thread, see
docs/design.md#performance-facts); batches go to a worker thread, where FAISS may use
``batch_threads`` threads, so the loop keeps serving.
"""

from __future__ import annotations

from functools import lru_cache
from time import perf_counter

import faiss
import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool

from service.errors import FieldError, PayloadTooLargeError, validation_response
from service.fast_parse import parse_retrieve
from service.schemas import BatchRequest, BatchResponse, RetrieveRequest, RetrieveResponse
from service.settings import Settings
from service.state import AppState

router = APIRouter(tags=["retrieve"])
JSON = "application/json"
ERRORS = {
    404: {"description": "unknown scenario"},
    413: {"description": "body or batch too large"},
    422: {"description": "invalid field (the message names it)"},
}


def _body_schema(model) -> dict:
    """OpenAPI requestBody for a route that parses its own body (nested models inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {JSON: {"schema": inline(schema)}}}}


def retrieve_json(state: AppState, body: bytes, t0: float) -> bytes:
    """POST /v1/retrieve once the body is read: JSON bytes in, JSON bytes out. Raises domain
    errors, which ``service.errors.error_response`` maps to HTTP. Served by the app's edge
    (``CsmfApp`` in service/main.py) and by the documented route below.

    The body is parsed by ``service.fast_parse`` (pydantic for anything unusual) and the response
    is assembled from pre-serialised parts: the items' (service/item_json.py), the weights' (per
    distinct weights), the model version's; only the request id and the timing are new bytes."""
    req = parse_retrieve(body)
    if req.user_id is None and req.history is None:
        raise FieldError(("user_id",), "give `user_id` and/or `history`")
    retriever = state.bundle.retriever  # one read: the whole request uses one bundle
    k = check_k(state.settings, req.k)
    weights, scale, scenario, arm = state.scenarios.resolve(
        retriever, req.scenario, req.weights, req.user_id
    )
    hits = retriever.retrieve(
        req.user_id, req.history, scale, k, req.exclude, req.exclude_seen, req.explain, req.filter
    )
    outcomes = state.outcomes
    outcomes.count(scenario, "single", hits.cold_start, not hits.cold_start)
    request_id = outcomes.served(
        scenario, arm, req.user_id, retriever, hits.rows, cold=hits.cold_start
    )
    return b"".join(
        [
            b'{"items":',
            retriever.items_json(hits),
            b',"weights":',
            retriever.weights_json(weights),
            b',"scenario":',
            _json_str(scenario),
            b',"arm":',
            _json_str(arm),
            b',"request_id":"',
            request_id.encode(),  # v2.<hex>.<hex>.<base64url>.<base64url>.<base64url>.<hex>: nothing to escape
            b'","model_version":',
            retriever.model_version_json,
            b',"cold_start":true' if hits.cold_start else b',"cold_start":false',
            b',"warnings":' + to_json(hits.warnings) if hits.warnings else b"",
            b',"took_ms":',
            repr(round((perf_counter() - t0) * 1000, 3)).encode(),
            b"}",
        ]
    )


def check_k(settings: Settings, k: int | None) -> int:
    if k is None:
        return settings.default_k
    if not 1 <= k <= settings.max_k:
        raise FieldError(("k",), f"k must be in [1, {settings.max_k}], got {k}")
    return k


@lru_cache(maxsize=4096)  # scenario and arm names repeat
def _json_str(s: str | None) -> bytes:
    return to_json(s)


@router.post(
    "/v1/retrieve",
    response_model=RetrieveResponse,
    responses=ERRORS,
    openapi_extra=_body_schema(RetrieveRequest),
    summary="Top-k items for one user under a scenario or explicit objective weights",
)
async def retrieve(request: Request) -> Response:
    t0 = perf_counter()
    state: AppState = request.app.state.csmf
    body = await request.body()  # read under the body limit by the app's edge (service/main.py)
    return Response(retrieve_json(state, body, t0), media_type=JSON)


@router.post(
    "/v1/retrieve/batch",
    response_model=BatchResponse,
    responses=ERRORS,
    openapi_extra=_body_schema(BatchRequest),
    summary="Top-k items for many users: one batched encode, one batched search",
)
async def retrieve_batch(request: Request) -> Response:
    t0 = perf_counter()
    state: AppState = request.app.state.csmf
    body = await request.body()  # read under the body limit by the app's edge (service/main.py)
    try:  # Rust JSON → model: ~5x cheaper than FastAPI's json.loads + validate for 500 users
        req = BatchRequest.model_validate_json(body)
    except ValidationError as exc:
        return validation_response(exc)
    limit = state.settings.max_batch
    if len(req.users) > limit:
        raise PayloadTooLargeError(f"users: at most {limit} users per batch, got {len(req.users)}")
    for i, u in enumerate(req.users):
        if u.user_id is None and u.history is None:
            raise FieldError(("users", i, "user_id"), "give `user_id` and/or `history`")
    retriever = state.bundle.retriever
    k = check_k(state.settings, req.k)
    # One read of the scenario for the whole batch: an admin write (say, arms removed) while the
    # users are assigned cannot make the batch inconsistent or fail half-way.
    sc = None if req.weights is not None else state.scenarios.get(req.scenario)
    weights, scale, scenario, some_arm = state.scenarios.resolve(
        retriever, req.scenario, req.weights, None, sc
    )
    arms: list[str | None] = [None] * len(req.users)
    groups: dict[str | None, tuple[np.ndarray, list[int]]] = {None: (scale, list(range(len(arms))))}
    arm_weights: dict[str | None, bytes] = {}  # per result, only for scenarios with arms
    if some_arm is not None:  # experiment arms: one batched search per arm, users by assignment
        groups = {}
        for i, u in enumerate(req.users):
            w, s, _, arms[i] = state.scenarios.resolve(retriever, req.scenario, None, u.user_id, sc)
            if arms[i] not in groups:
                groups[arms[i]] = (s, [])
                named = dict(zip(retriever.objectives, w, strict=True))
                arm_weights[arms[i]] = b',"weights":' + to_json(named)
            groups[arms[i]][1].append(i)
        first = sc.arms[0]  # top level: the first arm's (as the scenario)
        weights = tuple(first.weights.get(o, 0.0) for o in retriever.objectives)
    threads = state.settings.batch_threads
    if req.filter is not None:
        retriever.compile_filter(req.filter)  # a bad filter is a 422 before the worker thread

    def work() -> bytes:
        faiss.omp_set_num_threads(threads)  # per-thread OpenMP setting: the loop thread keeps 1
        hits: list = [None] * len(req.users)
        for s, idx in groups.values():
            part = retriever.retrieve_batch(
                [(req.users[i].user_id, req.users[i].history) for i in idx],
                s,
                k,
                req.exclude,
                req.exclude_seen,
                req.explain,
                req.filter,
            )
            for i, h in zip(idx, part, strict=True):
                hits[i] = h
        cold = sum(h.cold_start for h in hits)
        outcomes = state.outcomes
        outcomes.count(scenario, "batch", cold, len(hits) - cold)
        # One list of parts, joined once: per user, its id and items, the constant pieces
        # (cold-start flag, arm, the arm's weights) serialised once per batch, its request id
        # (v2.<hex>.<hex>.<base64url>.<base64url>.<base64url>.<hex>: nothing to escape).
        arm_json = {arm: b',"arm":' + to_json(arm) + arm_weights.get(arm, b"") for arm in groups}
        impressions = dict.fromkeys(groups, 0)
        parts = [b'{"results":[']
        for u, h, arm in zip(req.users, hits, arms, strict=True):
            rid = outcomes.served(
                scenario, arm, u.user_id, retriever, h.rows, count=False, cold=h.cold_start
            )
            impressions[arm] += len(h.rows)
            parts += [
                b'{"user_id":',
                to_json(u.user_id),
                b',"items":',
                retriever.items_json(h),
                b',"cold_start":true' if h.cold_start else b',"cold_start":false',
                b',"warnings":' + to_json(h.warnings) if h.warnings else b"",
                arm_json[arm],
                b',"request_id":"',
                rid.encode(),
                b'"},',
            ]
        if len(parts) > 1:
            parts[-1] = b'"}'
        for arm, n in impressions.items():
            outcomes.count_impressions(scenario, arm, n)
        rest = {
            "weights": dict(zip(retriever.objectives, weights, strict=True)),
            "scenario": scenario,
            "model_version": retriever.model_version,
            "took_ms": round((perf_counter() - t0) * 1000, 3),
        }
        parts += [b"],", to_json(rest)[1:]]
        return b"".join(parts)

    return Response(await run_in_threadpool(work), media_type=JSON)
