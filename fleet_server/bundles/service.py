"""Building (or reusing) the bundle of a model version for a profile."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlmodel import Session, select

from edge_agent.contracts.errors import ConversionError
from firmware_profiles import Profile
from fleet_server.bundles.tables import Bundle, BundlePublic
from fleet_server.database import aware
from fleet_server.errors import ConflictError, NotFoundError, PermissionDeniedError
from fleet_server.keys.service import FleetSigner

if TYPE_CHECKING:
    from fleet_server.api.deps import AppState
from fleet_server.registry.service import version_by_id
from fleet_server.registry.tables import MLModel, ModelVersion

log = logging.getLogger(__name__)


def ensure_bundle(
    session: Session,
    app: AppState,
    model: MLModel,
    version: ModelVersion,
    profile: Profile,
    signer: FleetSigner,
    *,
    runtimes: list[str] | None = None,
    actor: str = "system",
    wait_s: float | None = None,
) -> Bundle:
    """The bundle for (version, profile, runtimes) signed by a usable key; when there is none,
    a build job makes it (or one already under way is awaited) for up to ``wait_s``
    (default ``rollout_build_wait_s``). Still building after that: ConflictError
    ``build_pending`` with the build's id."""
    from fleet_server.builds.service import (
        cache_key,
        normalize_options,
        request_build,
        usable_bundle,
        wait_for,
    )

    options = normalize_options(None, runtimes, None)
    key = cache_key(version, profile, options)
    found = usable_bundle(session, key, signer)
    if found is not None:
        return found
    build = request_build(
        session, app.builds, app.catalog, signer, model, version, profile, options, actor, key
    )
    build_id = build.id
    wait_s = app.settings.rollout_build_wait_s if wait_s is None else wait_s
    done = wait_for(app.engine, build_id, wait_s)
    if done.state == "failed":
        error = done.error or {}
        raise ConversionError(
            f"the build for profile {profile.name!r} failed (edgefleet builds show {build_id}): "
            f"{error.get('message', 'unknown error')}",
            reason=str(error.get("reason", "build_failed")),
            build_id=build_id,
            profile=profile.name,
        )
    if done.state != "succeeded":
        raise ConflictError(
            f"the build for profile {profile.name!r} is still {done.state} after "
            f"{wait_s:.0f} s; create the rollout again when "
            f"`edgefleet builds show {build_id}` says succeeded",
            reason="build_pending",
            build_id=build_id,
        )
    session.expire_all()
    found = usable_bundle(session, key, signer)
    if found is None:
        raise ConflictError(
            f"build {build_id} succeeded but its bundle is no longer usable (signing key "
            "rotated meanwhile); create the rollout again",
            reason="build_pending",
        )
    return found


def require_assigned(session: Session, device_id: str, sha256: str) -> None:
    """A device may download only bundles it was assigned (now, or by an earlier rollout, so
    that a rollback can fetch the previous version again)."""
    from fleet_server.devices.tables import DesiredStateRecord
    from fleet_server.rollouts.tables import RolloutTarget

    record = session.get(DesiredStateRecord, device_id)
    if record is not None:
        slots = record.document.get("signed", {}).get("slots", {})
        if any(s.get("bundle_sha256") == sha256 for s in slots.values()):
            return
    target = session.exec(
        select(RolloutTarget).where(
            RolloutTarget.device_id == device_id, RolloutTarget.bundle_sha256 == sha256
        )
    ).first()
    if target is None:
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
    return BundlePublic(
        sha256=bundle.sha256,
        model=model.name,
        version=version.version,
        profile=bundle.profile,
        runtime=bundle.runtime,
        precision=bundle.precision,
        signing_key_id=bundle.signing_key_id,
        size=bundle.size,
        passed_over=bundle.passed_over,
        created_at=aware(bundle.created_at),
        manifest=bundle.manifest,
    )
