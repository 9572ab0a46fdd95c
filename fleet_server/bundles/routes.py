"""/v1/bundles: download by sha256 (HTTP Range supported) and metadata."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from fleet_server.api.deps import PrincipalDep, SessionDep, StateDep, Viewer
from fleet_server.bundles import service
from fleet_server.bundles.tables import BundlePublic
from fleet_server.errors import NotFoundError

router = APIRouter(prefix="/v1/bundles", tags=["bundles"])

#: A bundle is named by its sha256, in lowercase hex.
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="the bundle's sha256")]


@router.get("/{sha256}", response_class=FileResponse)
def download_bundle(
    sha256: Sha256, state: StateDep, session: SessionDep, principal: PrincipalDep
) -> Any:
    """The bundle file. Devices and API tokens may download; ``Range`` requests resume."""
    service.get_bundle(session, sha256)
    if principal.device_id is not None:
        service.require_assigned(session, principal.device_id, sha256)
    else:
        principal.require("viewer")
    path = state.store.path(sha256)
    if not path.is_file():
        raise NotFoundError(f"bundle {sha256} is missing from the artifact store")
    return FileResponse(path, media_type="application/x-tar", filename=f"{sha256}.efb")


@router.get("/{sha256}/manifest")
def bundle_manifest(sha256: Sha256, session: SessionDep, _: Viewer) -> dict[str, Any]:
    return service.get_bundle(session, sha256).manifest


@router.get("/{sha256}/info", response_model=BundlePublic)
def bundle_info(sha256: Sha256, session: SessionDep, _: Viewer) -> BundlePublic:
    return service.to_public(session, service.get_bundle(session, sha256))
