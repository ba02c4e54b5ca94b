"""Admin API behind the bearer token: scenario CRUD, bundle info, hot reload."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from csmf.errors import WeightsError
from csmf.names import NAME_PATTERN, NAME_RULE
from service.deps import Admin, State
from service.errors import FieldError
from service.experiments import Arm, ArmsError, check_arms
from service.schemas import ArmOut, BundleInfo, ReloadRequest, Scenario, ScenarioIn, ScenarioList

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Admin])
# pydantic-core's regex engine: `$` is the end of the text (no newline before it is accepted).
Name = Annotated[str, Path(pattern=f"^{NAME_PATTERN}$", description=f"scenario name: {NAME_RULE}")]
AUTH = {
    401: {"description": "no bearer token"},
    403: {"description": "wrong token or admin disabled"},
}


def _out(s) -> Scenario:
    return Scenario(
        name=s.name,
        weights=s.weights,
        description=s.description,
        version=s.version,
        updated_at=s.updated_at,
        arms=[ArmOut(**a.doc()) for a in s.arms] if s.arms else None,
    )


@router.get("/scenarios", response_model=ScenarioList, responses=AUTH)
def list_scenarios(state: State) -> ScenarioList:
    w = state.scenarios.store
    return ScenarioList(
        scenarios=[_out(s) for _, s in sorted(w.scenarios.items())],
        store=w.backend,
        state=w.health.as_dict()["state"],
    )


@router.get("/scenarios/{name}", response_model=Scenario, responses={**AUTH, 404: {}})
def get_scenario(name: Name, state: State) -> Scenario:
    return _out(state.scenarios.store.get(name))


@router.put(
    "/scenarios/{name}",
    response_model=Scenario,
    responses={**AUTH, 409: {"description": "expected_version is not the current one"}, 422: {},
               503: {}},
)  # fmt: skip
def put_scenario(name: Name, body: ScenarioIn, state: State) -> Scenario:
    """Create or replace. Weights must be finite, >= 0, not all zero, for known objectives.
    With ``arms`` (an experiment): 1..16 arms, unique names, shares summing to 1 (within 1e-9),
    valid weights in each; the scenario's ``weights`` are then the first arm's. With
    ``expected_version``: only if the scenario is still at that version (0: absent), else 409."""
    r, store = state.bundle.retriever, state.scenarios.store
    if (body.weights is None) == (body.arms is None):
        raise FieldError(("weights",), "give exactly one of `weights` or `arms`")
    if body.arms is None:
        weights = r.weights(body.weights)  # WeightsError → 422 naming `weights`
        named = dict(zip(r.objectives, weights, strict=True))
        return _out(store.put(name, named, body.description, (), body.expected_version))
    arms = []
    for i, a in enumerate(body.arms):
        try:
            w = r.weights(a.weights)
        except WeightsError as exc:
            raise FieldError(("arms", i, "weights"), f"arm {a.name!r}: {exc}") from None
        arms.append(Arm(a.name, dict(zip(r.objectives, w, strict=True)), float(a.share)))
    try:
        check_arms(arms)
    except ArmsError as exc:
        raise FieldError(("arms",), str(exc)) from None
    cas = body.expected_version
    return _out(store.put(name, arms[0].weights, body.description, arms, cas))


@router.delete("/scenarios/{name}", responses={**AUTH, 404: {}, 409: {}, 503: {}})
def delete_scenario(name: Name, state: State) -> dict:
    state.scenarios.store.delete(name)
    return {"deleted": name}


@router.get("/bundle", response_model=BundleInfo, responses=AUTH)
def bundle_info(state: State) -> dict:
    return state.bundle.retriever.info()


@router.post(
    "/reload", responses={**AUTH, 409: {}, 422: {"description": "bad bundle; old one serving"}}
)
def reload(state: State, body: ReloadRequest | None = None) -> dict:
    """Load and verify a bundle fully, then swap it in atomically. On any failure the old bundle
    keeps serving and the error is returned (422)."""
    old, new = state.bundle.reload(body.bundle if body else None)
    return {"status": "reloaded", "previous": old.model_version, "bundle": new.info()}
