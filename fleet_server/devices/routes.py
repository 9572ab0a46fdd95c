"""/v1/devices: the enrolled fleet (enrollment itself is in ``fleet_server.auth``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from fleet_server.api.deps import Operator, SessionDep, Viewer
from fleet_server.api.schemas import RequestBody
from fleet_server.devices import service
from fleet_server.devices.selectors import Selector
from fleet_server.devices.tables import DevicePublic

router = APIRouter(tags=["devices"])


@router.get("/v1/devices", response_model=list[DevicePublic])
def list_devices(
    session: SessionDep,
    _: Viewer,
    selector: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="labels and profile, e.g. hw=rpi4,site in (berlin,paris),!exempt",
        ),
    ] = None,
) -> list[DevicePublic]:
    chosen = Selector.parse(selector) if selector else None
    return [service.to_public(session, d) for d in service.list_devices(session, chosen)]


class LabelChange(RequestBody):
    set: dict[str, str] = Field(default_factory=dict, max_length=64)
    remove: list[str] = Field(default_factory=list, max_length=64)


@router.patch("/v1/devices/{device_id}/labels", response_model=DevicePublic)
def change_labels(
    device_id: str, body: LabelChange, session: SessionDep, principal: Operator
) -> DevicePublic:
    """Set and remove labels; cohorts select devices by them."""
    device = service.change_labels(session, device_id, body.set, body.remove, principal.name)
    return service.to_public(session, device)


@router.get("/v1/devices/{device_id}", response_model=DevicePublic)
def show_device(device_id: str, session: SessionDep, _: Viewer) -> DevicePublic:
    return service.to_public(session, service.get_device(session, device_id))
