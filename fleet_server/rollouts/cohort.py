"""The cohort: which devices a rollout holds, and the bundle each of them gets.

A rollout's cohort is dynamic: each step, devices that now match its selector join as
``scheduled`` targets (with the bundle for their profile and runtimes: built when missing,
``excluded`` with the reason when the build fails), and targets that no longer match are
``released``. A device another active rollout on the same slot holds is left to it. A HIL
rig's devices are reached by id only, never by a selector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from edge_agent.contracts.errors import ConversionError
from firmware_profiles import ProfileError
from fleet_server.builds.runner import BuildRunner
from fleet_server.builds.service import ensure_bundle
from fleet_server.devices.selectors import Selector
from fleet_server.devices.tables import Device
from fleet_server.errors import ConflictError
from fleet_server.hil.tables import RIG_LABEL
from fleet_server.keys.service import FleetSigner
from fleet_server.registry.service import version_by_id
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.progress import DeviceRow
from fleet_server.rollouts.step import EngineConfig, Step
from fleet_server.rollouts.tables import (
    ACTIVE_STATES,
    Rollout,
    RolloutTarget,
    TargetPhase,
)
from fleet_server.rollouts.targets import TargetRow

__all__ = [
    "BundleChoice",
    "Cohort",
    "Prepared",
    "choose_bundle",
    "cohort_of",
    "matching",
    "members",
    "prepare_bundles",
    "sync",
]

#: (profile, runtimes the device has — None when it has not said): one bundle each.
Cohort = tuple[str, tuple[str, ...] | None]


def cohort_of(device: Device | DeviceRow) -> Cohort:
    return device.profile, tuple(sorted(device.runtimes)) if device.runtimes else None


@dataclass(frozen=True)
class BundleChoice:
    """For one cohort: its bundle, or that its build is still running, or why it has none."""

    sha256: str | None = None
    pending_build: str | None = None
    excluded: str | None = None


def choose_bundle(
    session: Session,
    runner: BuildRunner,
    model: MLModel,
    version: ModelVersion,
    cohort: Cohort,
    signer: FleetSigner,
    actor: str,
    *,
    wait_s: float,
) -> BundleChoice:
    """Commits (a build request is its own transaction): call outside the rollout's lock."""
    profile_name, runtimes = cohort
    try:
        profile = runner.catalog.get(profile_name)
    except ProfileError:
        return BundleChoice(excluded=f"device profile {profile_name!r} is no longer known")
    try:
        bundle = ensure_bundle(
            session, runner, model, version, profile, signer,
            runtimes=list(runtimes) if runtimes is not None else None,
            actor=actor, wait_s=wait_s,
        )  # fmt: skip
    except ConflictError as e:
        if e.reason == "build_pending":
            return BundleChoice(pending_build=str(e.fields.get("build_id") or ""))
        raise
    except ConversionError as e:
        return BundleChoice(excluded=f"no bundle for {profile_name}: {e.message}")
    return BundleChoice(sha256=bundle.sha256)


@dataclass
class Prepared:
    """What a step reads before it takes the rollout's lock: the cohort's members now, and a
    bundle for each of their cohorts (profile x runtimes) that has one. No members: the
    rollout was not active when read (the step decides nothing)."""

    members: dict[str, DeviceRow] | None = None
    choices: dict[Cohort, BundleChoice] = field(default_factory=dict)


def prepare_bundles(engine: Engine, config: EngineConfig, rollout_id: str, actor: str) -> Prepared:
    """The members, and bundles for the cohorts of devices the rollout has no bundle for yet
    (newcomers, builds that were pending). Outside the lock: a build request commits. The
    step goes on with these members (read once a step: 10,000 devices' labels)."""
    with Session(engine) as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or rollout.state not in ACTIVE_STATES:
            return Prepared()
        targets = {
            device_id: (sha256, phase)
            for device_id, sha256, phase in session.exec(
                select(
                    RolloutTarget.device_id, RolloutTarget.bundle_sha256, RolloutTarget.phase
                ).where(RolloutTarget.rollout_id == rollout_id)
            ).all()
        }
        known: dict[Cohort, BundleChoice] = {}
        wanted: set[Cohort] = set()
        cohort_now = members(session, rollout)
        prepared = Prepared(cohort_now, known)
        for device in cohort_now.values():
            cohort = cohort_of(device)
            sha256, phase = targets.get(device.id, (None, None))
            if sha256:
                known[cohort] = BundleChoice(sha256=sha256)
            elif phase is None or phase == TargetPhase.SCHEDULED:
                wanted.add(cohort)
        missing = wanted - set(known)
        if not missing:
            return prepared
        model, version = version_by_id(session, rollout.model_version_id)
        try:
            signer = config.keys.signer(session)
        except ConflictError:
            return prepared
        for cohort in sorted(missing, key=str):
            known[cohort] = choose_bundle(
                session, config.runner, model, version, cohort, signer, actor, wait_s=0
            )
        return prepared


def members(session: Session, rollout: Rollout) -> dict[str, DeviceRow]:
    """The devices the cohort holds now."""
    if rollout.devices is not None:
        return matching(session, rollout.devices, None)
    selector = (
        Selector.parse(rollout.cohort)
        if rollout.cohort is not None
        else Selector.from_labels(rollout.selector or {})
    )
    return matching(session, None, selector)


def matching(
    session: Session, device_ids: list[str] | None, selector: Selector | None
) -> dict[str, DeviceRow]:
    """The enrolled devices of ``device_ids``, or those ``selector`` matches, without their
    reports (labels and profile decide; reading 10,000 reports to choose would cost more than
    the step). A HIL rig's devices are reached by id only; a decommissioned device by none."""
    query = select(Device.id, Device.profile, Device.labels, Device.runtimes).where(
        col(Device.decommissioned_at).is_(None)
    )
    if device_ids is not None:
        rows = session.exec(query.where(col(Device.id).in_(device_ids))).all()
        return {r[0]: _light(r) for r in rows}
    chosen = selector or Selector.from_labels({})
    return {
        r[0]: _light(r)
        for r in session.exec(query).all()
        if RIG_LABEL not in (r[2] or {}) and chosen.matches(dict(r[2] or {}), r[1])
    }


def sync(
    step: Step,
    targets: dict[str, TargetRow],
    cohort: dict[str, DeviceRow],
    choices: dict[Cohort, BundleChoice],
) -> None:
    """Bring ``targets`` (the rollout's rows, by device) in line with ``cohort``: newcomers
    join, bundles chosen since are set, leavers are released."""
    session, rollout, now = step.session, step.rollout, step.now
    taken = taken_elsewhere(session, rollout)
    for device_id, device in cohort.items():
        target = targets.get(device_id)
        choice = choices.get(cohort_of(device))
        if target is None:
            if device_id in taken:
                continue  # another active rollout on this slot has it
            target = TargetRow(
                id=None,
                rollout_id=rollout.id,
                device_id=device_id,
                phase=TargetPhase.SCHEDULED,
                added_at=now,
                stage=rollout.stage,
            )
            targets[device_id] = target
            step.targets.touch(target)
            if rollout.stage > 0 or rollout.stage_started_at is not None:
                step.event("device_joined", f"{device_id} joined the cohort", device_id=device_id)
        if target.phase in (TargetPhase.SCHEDULED, TargetPhase.EXCLUDED) and choice:
            if choice.sha256 is not None:
                if (target.bundle_sha256, target.phase, target.note) != (
                    choice.sha256,
                    TargetPhase.SCHEDULED,
                    None,
                ):
                    target.bundle_sha256, target.phase, target.note = (
                        choice.sha256,
                        TargetPhase.SCHEDULED,
                        None,
                    )
                    step.targets.touch(target)
            elif choice.excluded is not None and target.phase != TargetPhase.EXCLUDED:
                target.phase, target.note = TargetPhase.EXCLUDED, choice.excluded
                step.targets.touch(target)
                step.event("device_excluded", choice.excluded, device_id=device_id)
            elif choice.pending_build and target.note != (
                note := f"waiting for build {choice.pending_build}"
            ):
                target.note = note
                step.targets.touch(target)
    for device_id, target in targets.items():
        if device_id in cohort or target.phase in (TargetPhase.RELEASED, TargetPhase.EXCLUDED):
            continue
        if target.phase in (TargetPhase.SCHEDULED, TargetPhase.NOTIFIED):
            target.phase = TargetPhase.RELEASED
            target.note = "left the cohort (labels or profile changed, or it was removed)"
            step.targets.touch(target)
            step.event("device_released", target.note, device_id=device_id)


def taken_elsewhere(session: Session, rollout: Rollout) -> set[str]:
    """Devices another active rollout on the same slot holds."""
    rows = session.exec(
        select(RolloutTarget.device_id)
        .join(Rollout, col(Rollout.id) == col(RolloutTarget.rollout_id))
        .where(
            Rollout.slot == rollout.slot,
            Rollout.id != rollout.id,
            col(Rollout.state).in_([str(s) for s in ACTIVE_STATES]),
            col(RolloutTarget.phase).in_([TargetPhase.SCHEDULED, TargetPhase.NOTIFIED]),
        )
    ).all()
    return set(rows)


def _light(row: Any) -> DeviceRow:
    return DeviceRow(row[0], row[1], dict(row[2] or {}), dict(row[3]) if row[3] else None)
