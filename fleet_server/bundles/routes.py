"""/v1/bundles: download by sha256 (HTTP Range supported) and metadata."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from fleet_server.api.deps import PrincipalDep, SessionDep, StateDep, Viewer
from fleet_server.artifacts.responses import blob_response, presigned_redirect
from fleet_server.bundles import service
from fleet_server.bundles.tables import BundlePublic

router = APIRouter(prefix="/v1/bundles", tags=["bundles"])

#: A bundle is named by its sha256, in lowercase hex.
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="the bundle's sha256")]


@router.get(
    "/{sha256}",
    response_class=Response,
    responses={
        200: {"content": {"application/x-tar": {}}, "description": "the bundle"},
        206: {"content": {"application/x-tar": {}}, "description": "the range asked for"},
        307: {"description": "a device is sent to a presigned URL of the S3 store"},
        416: {"description": "the range starts past the bundle's end"},
    },
)
def download_bundle(
    sha256: Sha256,
    request: Request,
    state: StateDep,
    session: SessionDep,
    principal: PrincipalDep,
) -> Any:
    """The bundle file. Devices and API tokens may download; ``Range`` requests resume. With
    ``EDGEFLEET_BUNDLE_DOWNLOADS=presigned`` a device is redirected (307) to a short-lived
    presigned URL of the S3 store, where it resumes with ``Range`` the same way."""
    service.get_bundle(session, sha256)
    if principal.device_id is not None:
        service.require_assigned(session, principal.device_id, sha256)
        settings = state.settings
        if settings.bundle_downloads == "presigned":
            redirect = presigned_redirect(state.store, sha256, settings.presigned_url_ttl_s)
            if redirect is not None:
                return redirect
    else:
        principal.require("viewer")
    return blob_response(
        state.store,
        sha256,
        request,
        session=session,
        media_type="application/x-tar",
        filename=f"{sha256}.efb",
    )


@router.get("/{sha256}/manifest")
def bundle_manifest(sha256: Sha256, session: SessionDep, _: Viewer) -> dict[str, Any]:
    return service.get_bundle(session, sha256).manifest


@router.get("/{sha256}/info", response_model=BundlePublic)
def bundle_info(sha256: Sha256, session: SessionDep, _: Viewer) -> BundlePublic:
    return service.to_public(session, service.get_bundle(session, sha256))
