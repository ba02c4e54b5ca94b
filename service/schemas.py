"""Request and response bodies of the HTTP API.

Request models forbid unknown fields, so a typo (``"scenaro"``) is a 422 naming it rather than a
silently ignored option. Limits that depend on settings (``k <= max_k``, batch size) are checked
by the routes, which know the settings; the static caps here only bound what one body can hold.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from csmf.weights import MAX_WEIGHT

MAX_LIST = 10_000  # ids in `history` / `exclude` of one request
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# The JSON schema of request weights says what parse_weights enforces (csmf/weights.py); the
# served cascade's objective names and count are filled in per bundle by service/openapi.py.
# Validation itself stays in parse_weights, whose messages name the objective and the value.
_WEIGHT = {"type": "number", "minimum": 0, "maximum": MAX_WEIGHT}
WEIGHTS_SCHEMA = {
    "anyOf": [
        {"type": "object", "additionalProperties": _WEIGHT, "minProperties": 1},
        {"type": "array", "items": _WEIGHT, "minItems": 1},
    ],
    "description": "objective weights: by name (the served bundle's objectives; a missing name "
    "is 0) or a list with one weight per objective in cascade order; each in [0, 1e6], not all "
    "zero, the largest at least 1e-6 (only ratios matter)",
    "x-csmf-weights": True,
}
Weights = Annotated[dict[str, float] | list[float], WithJsonSchema(WEIGHTS_SCHEMA)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserQuery(_Strict):
    user_id: Id | None = Field(None, description="known user: features and history from the store")
    history: list[Id] | None = Field(
        None,
        max_length=MAX_LIST,
        description="inline behaviour history, item ids oldest → newest; replaces the stored one",
    )


class RetrieveOptions(_Strict):
    k: int | None = Field(
        None, description="items to return, 1..max_k (default: settings.default_k)"
    )
    scenario: str | None = Field(
        None, description="named weights (admin-managed); default 'default'"
    )
    weights: Weights | None = Field(
        None,
        description='explicit objective weights: {"exposure":1,"click":1.8,"conversion":1.2} '
        "or a list in cascade order (one per objective); each in [0, 1e6], not all zero; "
        "excludes `scenario`",
    )
    exclude: list[Id] = Field(
        default_factory=list, max_length=MAX_LIST, description="item ids never returned"
    )
    exclude_seen: bool = Field(
        True,
        description="never return items in the user's history (stored or inline) — on by "
        "default, as a recommender frontend expects; false to allow items already seen",
    )
    explain: bool = Field(False, description="add per-objective scores s_t to every item")
    filter: dict[str, Any] | None = Field(
        None,
        description="only items whose attributes match, over the bundle's filterable columns "
        "(GET /admin/bundle → filterable): "
        '{"field": "genre", "eq": "drama"}, {"field": "genre", "in": ["drama", "comedy"]}, '
        '{"field": "price", "gte": 10, "lt": 50}, {"and": [...]}, {"or": [...]}, {"not": {...}}; '
        "applied inside the search (exact on flat; approximate types search a filter allowing "
        "< 1 % of items exactly), together with `exclude` and `exclude_seen`",
        examples=[
            {"and": [{"field": "genre", "in": ["drama", "comedy"]}, {"field": "price", "lt": 20}]}
        ],
    )


class RetrieveRequest(UserQuery, RetrieveOptions):
    """POST /v1/retrieve: one user (``user_id`` and/or ``history``)."""


class BatchRequest(RetrieveOptions):
    """POST /v1/retrieve/batch: many users, one set of options, one encode, one search."""

    users: list[UserQuery] = Field(min_length=1, description="at most settings.max_batch users")


class Item(BaseModel):
    item_id: str
    score: float = Field(description="sum_t k_t s_t under the weights used")
    scores: dict[str, float] | None = Field(None, description="per-objective s_t (explain)")
    meta: dict[str, object] | None = Field(None, description="the bundle's display columns")


COLD_START = (
    "true when the cold-start vector was used: a user unknown to the store with no usable "
    "history (none given, or inline history ids none of which the bundle knows)"
)
WARNINGS = (
    "things the request asked for that were not honoured as given, e.g. inline history ids "
    "unknown to the served bundle; absent when there are none"
)


class RetrieveResponse(BaseModel):
    items: list[Item]
    weights: dict[str, float]
    scenario: str | None = Field(description="scenario used, null for explicit weights")
    arm: str | None = Field(None, description="experiment arm that served (scenarios with arms)")
    request_id: str = Field(description="send it back with POST /v1/feedback")
    model_version: str
    cold_start: bool = Field(description=COLD_START)
    warnings: list[str] | None = Field(None, description=WARNINGS)
    took_ms: float


class BatchResult(BaseModel):
    user_id: str | None
    items: list[Item]
    cold_start: bool = Field(description=COLD_START)
    warnings: list[str] | None = Field(None, description=WARNINGS)
    arm: str | None = Field(None, description="experiment arm that served this user")
    weights: dict[str, float] | None = Field(
        None, description="this user's arm's weights (scenarios with arms; else the top level's)"
    )
    request_id: str = Field(description="send it back with POST /v1/feedback")


class BatchResponse(BaseModel):
    results: list[BatchResult]
    weights: dict[str, float]
    scenario: str | None
    model_version: str
    took_ms: float


class ArmIn(_Strict):
    name: str = Field(description="unique within the scenario; letters, digits, _ . -")
    weights: Weights = Field(description="this arm's objective weights (as a scenario's)")
    share: float = Field(description="fraction of users, in (0, 1]; shares sum to 1")


class ArmOut(BaseModel):
    name: str
    weights: dict[str, float]
    share: float


class ScenarioIn(_Strict):
    weights: Weights | None = Field(
        None,
        description="by objective name (missing names = 0) or a list in cascade order (one per "
        "objective); each in [0, 1e6], not all zero. Give `weights` or `arms`",
    )
    arms: list[ArmIn] | None = Field(
        None,
        description="an experiment: users are split over the arms by a stable hash of "
        "(scenario, user id); shares sum to 1",
    )
    description: str = Field("", max_length=1000)
    expected_version: int | None = Field(
        None,
        ge=0,
        description="compare-and-set: the scenario's `version` this write replaces (from GET), 0 "
        "if it must not exist yet; if it has changed since, the answer is 409 and nothing is "
        "written. Omitted: the write is unconditional",
    )


class Scenario(BaseModel):
    name: str
    weights: dict[str, float]
    description: str
    version: int = Field(
        description="grows with every write of this scenario (Redis: ms of Redis's clock, or +1; "
        "embedded: a counter) — compare versions, do not count them"
    )
    updated_at: str = Field(description="ISO 8601 UTC time of the last write")
    arms: list[ArmOut] | None = Field(None, description="experiment arms, if any")


class ScenarioList(BaseModel):
    scenarios: list[Scenario]
    store: str
    state: str


class FeedbackIn(_Strict):
    request_id: str = Field(
        min_length=1, max_length=16384, description="from the retrieve response"
    )
    user_id: Id | None = Field(
        None, description="the user the request was for; omitted for a history-only request"
    )
    item_id: Id = Field(description="the item the event is about")
    event: str = Field(description="click or conversion")


class ReloadRequest(_Strict):
    bundle: str | None = Field(None, description="bundle folder; default: the one being served")


class ItemsIn(_Strict):
    items: list[Any] = Field(
        description="item rows with the item table's columns: the id (`item_id`), the item "
        "tower's features, filterable attributes, display columns; optionally `vector` (the "
        "bundle's dimension) instead of encoding the features. An id the model never saw is a "
        "cold item: its vector comes from its features with the unknown id row"
    )


class ItemIdsIn(_Strict):
    ids: list[Any] = Field(description="item ids to delete (unknown or deleted ids: no-ops)")


class ItemError(BaseModel):
    item_id: str = Field(description="the item's id, or items[i] / ids[i] when the id is bad")
    error: str


class ItemsOut(BaseModel):
    seq: int | None = Field(description="item-log record of this write (null: nothing written)")
    written: list[str] = Field(description="ids upserted (or, for a delete, deleted)")
    absent: list[str] = Field(
        default_factory=list, description="delete: ids that were unknown or already deleted"
    )
    errors: list[ItemError] = Field(description="items rejected, with why")


class BundleInfo(BaseModel):
    path: str
    model_version: str
    objectives: list[str]
    slice_sizes: list[int]
    index_type: str
    search_params: dict[str, object]
    index: dict[str, object] = Field(
        description="backend, kind, exact, filters, in_bundle, items, bytes, bytes_per_item"
    )
    items: int
    users: int
    filterable: dict[str, str] = Field(description="filterable item column → string/number/bool")
    response_json_bytes: int = Field(
        description="memory held by the pre-serialised item JSON (service/item_json.py)"
    )
    manifest: dict[str, object]
    item_log: dict[str, object] | None = Field(
        None,
        description="the item log: file, applied_seq, folded_seq (in the bundle's files), "
        "log_base (records up to it truncated), log_bytes, rows, deleted, writes, tombstones",
    )
    loaded_at: str
