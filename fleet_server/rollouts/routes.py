"""/v1/rollouts: deploy a model version to devices and follow its progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.rollouts import service
from fleet_server.rollouts.tables import RolloutCreate, RolloutPublic

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])


@router.post("", status_code=201, response_model=RolloutPublic)
def create_rollout(
    body: RolloutCreate,
    state: StateDep,
    session: SessionDep,
    principal: Operator,
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
    """Build bundles for the cohort's profiles and publish each device's new desired state."""
    settings = state.settings
    rollout, documents = service.create_rollout(
        session,
        body,
        principal.name,
        runner=state.builds,
        signer=state.keys.signer(session),
        public_url=settings.resolved_public_url,
        desired_ttl_s=settings.desired_state_ttl_s,
        build_wait_s=settings.rollout_build_wait_s if build_wait_s is None else build_wait_s,
    )
    state.control.publish_all(documents)
    return rollout


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(session: SessionDep, _: Viewer) -> list[RolloutPublic]:
    return service.list_rollouts(session)


@router.get("/{rollout_id}", response_model=RolloutPublic)
def show_rollout(rollout_id: str, session: SessionDep, _: Viewer) -> RolloutPublic:
    return service.get_rollout(session, rollout_id)
