"""Dependency aliases for routes: ``SessionDep``, ``StateDep``, and the role guards
``Viewer``, ``Operator``, ``Admin`` (each yields the authenticated :class:`Principal`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from firmware_profiles import ProfileCatalog
from fleet_server.artifacts import ArtifactStore
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.service import Principal, Role, authenticate
from fleet_server.keys.service import ServerKeys
from fleet_server.settings import Settings

if TYPE_CHECKING:
    from fleet_server.builds.service import BuildRunner
    from fleet_server.control.plane import ControlPlane


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: ArtifactStore
    catalog: ProfileCatalog
    control: ControlPlane
    keys: ServerKeys
    ca: FleetCA
    builds: BuildRunner


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.edgefleet
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with Session(state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(
    session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    return authenticate(session, authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _role(role: Role) -> Callable[[Principal], Principal]:
    def guard(principal: PrincipalDep) -> Principal:
        principal.require(role)
        return principal

    return guard


Viewer = Annotated[Principal, Depends(_role("viewer"))]
Operator = Annotated[Principal, Depends(_role("operator"))]
Admin = Annotated[Principal, Depends(_role("admin"))]
