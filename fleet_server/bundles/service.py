"""Bundles: lookup, description, and who may download one. (Building them is
:mod:`fleet_server.builds`.)"""

from __future__ import annotations

from sqlmodel import Session

from fleet_server.bundles.tables import Bundle, BundlePublic
from fleet_server.devices.tables import BundleGrant
from fleet_server.errors import NotFoundError, PermissionDeniedError
from fleet_server.registry.service import version_by_id


def require_assigned(session: Session, device_id: str, sha256: str) -> None:
    """A device may download only bundles it was assigned (now, or by an earlier document, so
    that a rollback can fetch the previous version again)."""
    if session.get(BundleGrant, (device_id, sha256)) is None:
        raise PermissionDeniedError(
            f"device {device_id} was not assigned bundle {sha256[:12]}…", device_id=device_id
        )


def get_bundle(session: Session, sha256: str) -> Bundle:
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise NotFoundError(f"no bundle with sha256 {sha256}", bundle_sha256=sha256)
    return bundle


def to_public(session: Session, bundle: Bundle) -> BundlePublic:
    model, version = version_by_id(session, bundle.model_version_id)
    return BundlePublic.model_validate(
        bundle, update={"model": model.name, "version": version.version}
    )
