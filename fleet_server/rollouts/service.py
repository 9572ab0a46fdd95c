"""Creating rollouts and computing their progress.

A rollout is checked and prepared completely (model version exists, every target enrolled,
a bundle built for every profile in the cohort) before the first desired-state document is
written; the documents and the rollout rows are committed in one transaction, and only then
published. A refused request changes no device's desired state.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from edge_agent.protocol.desired import SignedDesiredState, SlotAssignment
from edge_agent.protocol.lifecycle import SlotState
from edge_agent.protocol.status import ReportedStatus
from firmware_profiles import ProfileError
from fleet_server.audit.service import record
from fleet_server.builds.runner import BuildRunner
from fleet_server.builds.service import ensure_bundle
from fleet_server.bundles.tables import Bundle
from fleet_server.database import aware
from fleet_server.devices import desired
from fleet_server.devices.service import resolve_targets
from fleet_server.devices.tables import BundleGrant, Device
from fleet_server.errors import ConflictError, InvalidInputError, NotFoundError
from fleet_server.keys.service import FleetSigner
from fleet_server.registry.service import get_version, version_by_id
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.tables import (
    Rollout,
    RolloutCreate,
    RolloutPublic,
    RolloutState,
    RolloutTarget,
    TargetState,
    TargetStatus,
)


def backfill_bundle_grants(session: Session) -> int:
    """Grant every device the bundles its rollouts assigned it (databases from before
    ``bundle_grants`` existed: a rollback must still be able to fetch the previous version).
    Returns how many grants were added; idempotent."""
    granted = {(g.device_id, g.bundle_sha256) for g in session.exec(select(BundleGrant)).all()}
    added = 0
    now = datetime.now(UTC)
    for target in session.exec(select(RolloutTarget)).all():
        key = (target.device_id, target.bundle_sha256)
        if key not in granted and session.get(Device, target.device_id) is not None:
            session.add(BundleGrant(device_id=key[0], bundle_sha256=key[1], granted_at=now))
            granted.add(key)
            added += 1
    session.commit()
    return added


def default_slot(model_name: str) -> str:
    return model_name.replace(".", "-")[:63]


def create_rollout(
    session: Session,
    body: RolloutCreate,
    actor: str,
    *,
    runner: BuildRunner,
    signer: FleetSigner,
    public_url: str,
    desired_ttl_s: int,
    build_wait_s: float,
) -> tuple[RolloutPublic, dict[str, SignedDesiredState]]:
    """Returns the rollout and the documents to publish (already committed). Bundles that do
    not exist yet are built first (by ``runner``), waiting up to ``build_wait_s``; past that,
    ConflictError ``build_pending`` names the builds and nothing else has changed. Bundle
    URLs in the documents start with ``public_url``."""
    model, version = get_version(session, body.model, body.version)
    devices = resolve_targets(session, body.devices, body.selector)
    slot = body.slot or (f"{body.shadow_of}-shadow" if body.shadow_of else default_slot(model.name))
    if body.shadow_of is not None and body.shadow_of == slot:
        raise InvalidInputError("a shadow needs its own slot, not the one it shadows", field="slot")

    # One build per cohort: devices of a profile with the same runtimes installed. Every
    # missing build is queued before any is awaited, so they run side by side.
    wait_s = build_wait_s
    deadline = time.monotonic() + wait_s
    cohorts = sorted({cohort_of(d) for d in devices}, key=str)
    bundles: dict[tuple[str, tuple[str, ...] | None], Bundle] = {}
    pending: list[str] = []
    for final in (False, True):
        pending = []
        for cohort in cohorts:
            if cohort in bundles:
                continue
            try:
                bundles[cohort] = _cohort_bundle(
                    session, runner, model, version, cohort, signer, actor,
                    wait_s=max(0.0, deadline - time.monotonic()) if final else 0.0,
                )  # fmt: skip
            except ConflictError as e:
                if e.reason != "build_pending" or not e.fields.get("build_id"):
                    raise
                pending.append(e.fields["build_id"])
    if pending:
        raise ConflictError(
            f"{len(pending)} build(s) for this rollout still running after {wait_s:.0f} s "
            f"({', '.join(pending)}); create the rollout again when they have succeeded "
            "(the CLI follows them and does this for you)",
            reason="build_pending",
            build_ids=pending,
        )

    rollout = Rollout(
        id=uuid.uuid4().hex[:16],
        model_version_id=version.id or 0,
        slot=slot,
        selector=body.selector,
        created_at=datetime.now(UTC),
        created_by=actor,
    )
    session.add(rollout)
    documents: dict[str, SignedDesiredState] = {}
    for device in devices:
        bundle = bundles[cohort_of(device)]
        envelope = desired.assign_slot(
            session,
            device.id,
            slot,
            slot_assignment(public_url, model, version, bundle, rollout.id).model_copy(
                update={
                    "shadow_of": body.shadow_of,
                    "sample_rate": body.sample_rate,
                }
            ),
            ttl_s=desired_ttl_s,
            signer=signer,
        )
        documents[device.id] = envelope
        session.add(
            RolloutTarget(
                rollout_id=rollout.id,
                device_id=device.id,
                bundle_sha256=bundle.sha256,
                desired_seq=envelope.signed.seq,
            )
        )
    record(
        session,
        actor,
        "rollout.create",
        rollout.id,
        model=model.name,
        version=version.version,
        devices=[d.id for d in devices],
        selector=body.selector,
    )
    session.commit()
    return describe(session, rollout), documents


def _cohort_bundle(
    session: Session,
    runner: BuildRunner,
    model: MLModel,
    version: ModelVersion,
    cohort: tuple[str, tuple[str, ...] | None],
    signer: FleetSigner,
    actor: str,
    *,
    wait_s: float,
) -> Bundle:
    profile_name, runtimes = cohort
    try:
        profile = runner.catalog.get(profile_name)
    except ProfileError as e:
        raise InvalidInputError(f"device profile {profile_name!r} is no longer known") from e
    return ensure_bundle(
        session,
        runner,
        model,
        version,
        profile,
        signer,
        runtimes=list(runtimes) if runtimes is not None else None,
        actor=actor,
        wait_s=wait_s,
    )


def cohort_of(device: Device) -> tuple[str, tuple[str, ...] | None]:
    """(profile, runtimes the device has) — None when it has not said."""
    return device.profile, tuple(sorted(device.runtimes)) if device.runtimes else None


def slot_assignment(
    public_url: str, model: MLModel, version: ModelVersion, bundle: Bundle, rollout_id: str | None
) -> SlotAssignment:
    return SlotAssignment(
        model=model.name,
        version=version.version,
        bundle_sha256=bundle.sha256,
        bundle_url=f"{public_url}/v1/bundles/{bundle.sha256}",
        size=bundle.size,
        rollout_id=rollout_id,
    )


def _target_status(
    device: Device, target: RolloutTarget, slot: str, bundle: Bundle
) -> TargetStatus:
    reported = ReportedStatus.model_validate(device.reported) if device.reported else None
    report = reported.slots.get(slot) if reported else None
    running = None
    if report is not None:
        running = report.active.bundle_sha256 if report.active else _shadow_ref(report.shadow)
    error: dict[str, Any] | None = report.error.model_dump() if report and report.error else None
    state = TargetState.PENDING
    if (
        report is not None
        and report.target_sha256 == target.bundle_sha256
        and report.state in (SlotState.FAILED, SlotState.ROLLED_BACK)
    ):
        failed = report.state == SlotState.FAILED
        state = TargetState.FAILED if failed else TargetState.ROLLED_BACK
    elif report is not None and running == target.bundle_sha256:
        # Only a committed version is serving; between the switch and the commit (probation,
        # or a rollback under way) the device may still turn it down.
        # In a state a deployment ends in, what a slot runs is its committed version (after a
        # fleet rollback to it, the slot still names the version it left, and why).
        settled = report.state in (SlotState.COMMITTED, SlotState.FAILED, SlotState.ROLLED_BACK)
        state = TargetState.SERVING if settled else TargetState.PROBATION
    elif (
        reported
        and reported.refusal
        and reported.refusal.seq == target.desired_seq  # this document, not some other payload
        and device.reported_seq < target.desired_seq
    ):
        state, error = TargetState.REFUSED, reported.refusal.model_dump()
    return TargetStatus(
        device_id=device.id,
        profile=device.profile,
        bundle_sha256=target.bundle_sha256,
        runtime=bundle.runtime,
        precision=bundle.precision,
        state=state,
        device_state=report.state if report else None,
        online=device.online,
        error=error if state != TargetState.SERVING else None,
    )


def _shadow_ref(shadow: dict[str, Any] | None) -> str | None:
    return str(shadow["bundle_sha256"]) if shadow and "bundle_sha256" in shadow else None


def describe(session: Session, rollout: Rollout) -> RolloutPublic:
    model, version = version_by_id(session, rollout.model_version_id)
    targets = session.exec(
        select(RolloutTarget)
        .where(RolloutTarget.rollout_id == rollout.id)
        .order_by(col(RolloutTarget.device_id))
    ).all()
    statuses = []
    for t in targets:
        device = session.get(Device, t.device_id)
        bundle = session.get(Bundle, t.bundle_sha256)
        assert device is not None and bundle is not None
        statuses.append(_target_status(device, t, rollout.slot, bundle))
    counts = {s: 0 for s in TargetState}
    for s in statuses:
        counts[s.state] += 1
    if counts[TargetState.SERVING] == len(statuses):
        overall = RolloutState.COMPLETED
    elif counts[TargetState.PENDING] == 0 and counts[TargetState.PROBATION] == 0:
        overall = RolloutState.FAILED
    else:
        overall = RolloutState.IN_PROGRESS
    return RolloutPublic(
        id=rollout.id,
        model=model.name,
        version=version.version,
        slot=rollout.slot,
        selector=rollout.selector,
        created_at=aware(rollout.created_at),
        created_by=rollout.created_by,
        state=overall,
        counts={str(k): v for k, v in counts.items()},
        targets=statuses,
    )


def get_rollout(session: Session, rollout_id: str) -> RolloutPublic:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}", rollout_id=rollout_id)
    return describe(session, rollout)


def list_rollouts(session: Session) -> list[RolloutPublic]:
    rows = session.exec(select(Rollout).order_by(col(Rollout.created_at).desc())).all()
    return [describe(session, r) for r in rows]
