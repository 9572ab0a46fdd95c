"""/v1/builds: compile a model version for a profile (async), follow its log, read its report."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.builds import service
from fleet_server.builds.tables import BuildCreate, BuildLog, BuildPublic

router = APIRouter(prefix="/v1/builds", tags=["builds"])


@router.post("", status_code=202, response_model=BuildPublic)
def create_build(
    body: BuildCreate, state: StateDep, session: SessionDep, principal: Operator
) -> BuildPublic:
    """Queue a build (or return the existing one for the same inputs: builds are cached by
    model, profile, calibration data, options and toolchain versions)."""
    signer = state.keys.signer(session)
    return service.create_build(session, state.builds, state.catalog, signer, body, principal.name)


@router.get("", response_model=list[BuildPublic])
def list_builds(
    session: SessionDep,
    _: Viewer,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[BuildPublic]:
    return service.list_builds(session, model, limit)


@router.get("/{build_id}", response_model=BuildPublic)
def show_build(build_id: str, session: SessionDep, _: Viewer) -> BuildPublic:
    """Status, chosen artifact and every candidate's parity report."""
    return service.to_public(session, service.get_build(session, build_id))


@router.get("/{build_id}/log", response_model=BuildLog)
def build_log(
    build_id: str, session: SessionDep, _: Viewer, offset: Annotated[int, Query(ge=0)] = 0
) -> BuildLog:
    """The build's log from ``offset``; poll with the returned ``next_offset`` to follow it."""
    return service.read_log(session, build_id, offset)
