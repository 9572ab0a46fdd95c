"""/v1/devices and /v1/enrollment-tokens."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.auth.mqtt_passwords import write_password_file
from fleet_server.devices import service
from fleet_server.devices.tables import (
    DevicePublic,
    EnrollmentTokenCreate,
    EnrollmentTokenPublic,
    EnrollRequest,
    EnrollResponse,
)

router = APIRouter(tags=["devices"])


@router.post("/v1/enrollment-tokens", status_code=201, response_model=EnrollmentTokenPublic)
def create_enrollment_token(
    body: EnrollmentTokenCreate, state: StateDep, session: SessionDep, principal: Operator
) -> EnrollmentTokenPublic:
    """A one-time token a device trades for its identity at enrollment."""
    return service.create_enrollment_token(
        session,
        state.catalog,
        body,
        default_ttl_s=state.settings.enrollment_token_ttl_s,
        actor=principal.name,
    )


@router.post("/v1/devices/enroll", status_code=201, response_model=EnrollResponse)
def enroll(body: EnrollRequest, state: StateDep, session: SessionDep) -> EnrollResponse:
    """Called by ``edge-agent enroll``; authenticated by the enrollment token in the body."""
    root = state.keys.signer(session).root_public  # no keys, no enrollment: checked first
    reply = service.enroll(
        session,
        state.catalog,
        body,
        server_url=state.settings.resolved_public_url,
        mqtt_url=state.control.device_mqtt_url,
        root_public_key=root,
        ca=state.ca,
    )
    state.control.clear_desired(reply.device_id)
    if state.settings.broker_password_file is not None:
        write_password_file(session, state.settings.broker_password_file)
    return reply


@router.get("/v1/devices", response_model=list[DevicePublic])
def list_devices(session: SessionDep, _: Viewer) -> list[DevicePublic]:
    return [service.to_public(session, d) for d in service.list_devices(session)]


@router.get("/v1/devices/{device_id}", response_model=DevicePublic)
def show_device(device_id: str, session: SessionDep, _: Viewer) -> DevicePublic:
    return service.to_public(session, service.get_device(session, device_id))
