"""/v1/rollouts: deploy a model version to a cohort, follow it, and steer it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.api.schemas import RequestBody
from fleet_server.rollouts import service
from fleet_server.rollouts.tables import RolloutCreate, RolloutPublic

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

TargetsQuery = Annotated[
    bool,
    Query(description="include every device's state (false: counts, stages and gates only)"),
]


class AbortBody(RequestBody):
    reason: str | None = Field(default=None, max_length=400)


@router.post("", status_code=201, response_model=RolloutPublic)
def create_rollout(
    body: RolloutCreate,
    state: StateDep,
    session: SessionDep,
    principal: Operator,
    targets: TargetsQuery = True,
    build_wait_s: Annotated[
        float | None,
        Query(
            ge=0,
            le=86400,
            description="how long to wait for missing builds (default: the server's "
            "rollout_build_wait_s); still building after that: 409 build_pending with their ids",
        ),
    ] = None,
) -> RolloutPublic:
    """Build bundles for the cohort's profiles and record the rollout; the engine notifies its
    first stage right after the answer."""
    settings = state.settings
    return service.create_rollout(
        session,
        body,
        principal.name,
        engine=state.rollouts,
        runner=state.builds,
        signer=state.keys.signer(session),
        build_wait_s=settings.rollout_build_wait_s if build_wait_s is None else build_wait_s,
        include_targets=targets,
    )


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(
    session: SessionDep, _: Viewer, targets: TargetsQuery = True
) -> list[RolloutPublic]:
    return service.list_rollouts(session, include_targets=targets)


@router.get("/{rollout_id}", response_model=RolloutPublic)
def show_rollout(
    rollout_id: str, session: SessionDep, _: Viewer, targets: TargetsQuery = True
) -> RolloutPublic:
    """Per stage and per device progress, each gate's figure against its threshold, and the
    event history."""
    return service.get_rollout(session, rollout_id, include_targets=targets)


@router.post("/{rollout_id}/pause", response_model=RolloutPublic)
def pause_rollout(
    rollout_id: str, state: StateDep, session: SessionDep, principal: Operator
) -> RolloutPublic:
    """Notify no more devices (those notified carry on); gates still watch them."""
    state.rollouts.pause(rollout_id, principal.name)
    return service.get_rollout(session, rollout_id)


@router.post("/{rollout_id}/resume", response_model=RolloutPublic)
def resume_rollout(
    rollout_id: str, state: StateDep, session: SessionDep, principal: Operator
) -> RolloutPublic:
    state.rollouts.resume(rollout_id, principal.name)
    return service.get_rollout(session, rollout_id)


@router.post("/{rollout_id}/abort", response_model=RolloutPublic)
def abort_rollout(
    rollout_id: str,
    state: StateDep,
    session: SessionDep,
    principal: Operator,
    body: AbortBody | None = None,
) -> RolloutPublic:
    """Stop the rollout and give every device it touched its previous version back."""
    state.rollouts.abort(rollout_id, principal.name, body.reason if body else None)
    return service.get_rollout(session, rollout_id)


@router.post("/{rollout_id}/promote", response_model=RolloutPublic)
def promote_rollout(
    rollout_id: str, state: StateDep, session: SessionDep, principal: Operator
) -> RolloutPublic:
    """Start the next stage: approve one that waits for it, or cut the current bake short."""
    state.rollouts.promote(rollout_id, principal.name)
    return service.get_rollout(session, rollout_id)
