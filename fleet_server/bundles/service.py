"""Building (or reusing) the bundle of a model version for a profile."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from converters import build_bundle
from edge_agent.bundle.manifest import TensorSpec
from firmware_profiles import Profile
from fleet_server.artifacts import ArtifactStore
from fleet_server.bundles.tables import Bundle, BundlePublic
from fleet_server.database import aware
from fleet_server.errors import NotFoundError, PermissionDeniedError
from fleet_server.keys.service import FleetSigner
from fleet_server.registry.tables import MLModel, ModelVersion

log = logging.getLogger(__name__)


def ensure_bundle(
    session: Session,
    store: ArtifactStore,
    model: MLModel,
    version: ModelVersion,
    profile: Profile,
    signer: FleetSigner,
) -> Bundle:
    """The bundle for (version, profile) signed by a usable key, built now if there is none."""
    existing = _find(session, version, profile.name, signer)
    if existing is not None:
        return existing
    scratch = store.scratch_dir()
    try:
        result = build_bundle(
            source=store.path(version.source_sha256),
            source_sha256=version.source_sha256,
            name=model.name,
            version=version.version,
            inputs=[TensorSpec.model_validate(s) for s in version.inputs],
            outputs=[TensorSpec.model_validate(s) for s in version.outputs],
            profile=profile,
            out_path=scratch / "bundle.efb",
            signer=signer.sign,
            signing_key_id=signer.keyid,
        )
        sha256, size = store.put_file(result.path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert version.id is not None
    row = Bundle(
        sha256=sha256,
        model_version_id=version.id,
        profile=profile.name,
        runtime=result.target.runtime,
        precision=result.target.precision,
        signing_key_id=signer.keyid,
        size=size,
        manifest=result.manifest.model_dump(mode="json"),
        passed_over=result.passed_over,
        created_at=datetime.now(UTC),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # Built concurrently by another request or replica; theirs is equivalent.
        session.rollback()
        found = _find(session, version, profile.name, signer)
        assert found is not None
        return found
    log.info(
        "built bundle %s for %s %s on %s", sha256[:12], model.name, version.version, profile.name
    )
    return row


def _find(
    session: Session, version: ModelVersion, profile: str, signer: FleetSigner
) -> Bundle | None:
    rows = session.exec(
        select(Bundle).where(Bundle.model_version_id == version.id, Bundle.profile == profile)
    ).all()
    usable = [b for b in rows if signer.usable(b.signing_key_id)]
    # Prefer the current signing key, then the newest build.
    usable.sort(key=lambda b: (b.signing_key_id == signer.keyid, aware(b.created_at)), reverse=True)
    return usable[0] if usable else None


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
    version = session.get(ModelVersion, bundle.model_version_id)
    assert version is not None
    model = session.get(MLModel, version.model_id)
    assert model is not None
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
    )
