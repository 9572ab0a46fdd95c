"""Dependency aliases for routes: ``SessionDep``, ``StateDep``, and the role guards
``Viewer``, ``Operator``, ``Admin`` (each yields the authenticated :class:`Principal`).

This is the bottom floor of the server's HTTP side: every domain's routes import it, so it
imports no domain. The services in :class:`AppState` are named for the type checker only;
``fleet_server.app`` builds the state and hands routes the pieces each service takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet_server.api.limits import PRINCIPAL_STATE
from fleet_server.api.principal import Principal, Role
from fleet_server.settings import Settings

if TYPE_CHECKING:
    from firmware_profiles import ProfileCatalog
    from fleet_server.artifacts import ArtifactStore
    from fleet_server.auth.broker_files import GroupedWrites
    from fleet_server.auth.ca import FleetCA
    from fleet_server.builds.runner import BuildRunner
    from fleet_server.control.plane import ControlPlane
    from fleet_server.keys.service import ServerKeys
    from fleet_server.rollouts.engine import RolloutEngine
    from fleet_server.telemetry.service import TelemetryService

#: Finds the principal behind an ``Authorization`` header (``fleet_server.auth.service``).
Authenticator = Callable[[Session, str | None], Principal]
#: Finds the principal behind a dashboard session cookie's value.
SessionAuthenticator = Callable[[Session, str | None], Principal]


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
    authenticate: Authenticator
    authenticate_session: SessionAuthenticator
    telemetry: TelemetryService
    rollouts: RolloutEngine
    #: The password file's writes, shared by enrollments that arrive together (None: the
    #: broker has no password file).
    password_writes: GroupedWrites | None = None


async def get_state(request: Request) -> AppState:
    # async: no I/O here, and FastAPI runs a plain function dependency on its thread pool
    # (a hop between threads on every request for an attribute read).
    state: AppState = request.app.state.edgefleet
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with Session(state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(
    request: Request,
    state: StateDep,
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    # A request with a body was authenticated by the body-limit middleware already.
    found: Principal | None = getattr(request.state, PRINCIPAL_STATE, None)
    return found if found is not None else state.authenticate(session, authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _role(role: Role) -> Callable[[Principal], Principal]:
    def guard(principal: PrincipalDep) -> Principal:
        principal.require(role)
        return principal

    return guard


Viewer = Annotated[Principal, Depends(_role("viewer"))]
Operator = Annotated[Principal, Depends(_role("operator"))]
Admin = Annotated[Principal, Depends(_role("admin"))]
