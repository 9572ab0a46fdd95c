"""/v1/devices: the enrolled fleet (enrollment itself is in ``fleet_server.auth``)."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.api.deps import SessionDep, Viewer
from fleet_server.devices import service
from fleet_server.devices.tables import DevicePublic

router = APIRouter(tags=["devices"])


@router.get("/v1/devices", response_model=list[DevicePublic])
def list_devices(session: SessionDep, _: Viewer) -> list[DevicePublic]:
    return [service.to_public(session, d) for d in service.list_devices(session)]


@router.get("/v1/devices/{device_id}", response_model=DevicePublic)
def show_device(device_id: str, session: SessionDep, _: Viewer) -> DevicePublic:
    return service.to_public(session, service.get_device(session, device_id))
