"""Creating rollouts, and describing them.

A rollout is checked and prepared completely (model version exists, explicit targets enrolled,
no other active rollout on the slot overlaps the cohort unless this one supersedes it, a bundle
built for every profile in the cohort) before anything is written; the rollout, its targets
and its first event are committed in one transaction, and the engine's first step notifies the
first stage. A refused request changes nothing.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, col, select

from edge_agent.contracts.errors import ConversionError
from fleet_server.audit.service import record
from fleet_server.builds.runner import BuildRunner
from fleet_server.bundles.tables import Bundle
from fleet_server.database import advisory_lock, aware
from fleet_server.devices.desired import stored_slots
from fleet_server.devices.selectors import Selector
from fleet_server.devices.tables import BundleGrant, Device
from fleet_server.errors import ConflictError, InvalidInputError, NotFoundError
from fleet_server.hil import service as hil_service
from fleet_server.hil.tables import OPEN_STATES
from fleet_server.keys.service import FleetSigner
from fleet_server.registry.compat import io_differences
from fleet_server.registry.service import get_version, version_by_id
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.cohort import BundleChoice, choose_bundle, cohort_of, matching
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.gates import lacking
from fleet_server.rollouts.progress import (
    DeviceRow,
    TargetView,
    device_rows,
    in_order,
    stage_quota,
    target_view,
    view_slot,
)
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.tables import (
    ACTIVE_STATES,
    GateFigure,
    Rollout,
    RolloutEvent,
    RolloutEventPublic,
    RolloutPublic,
    RolloutState,
    RolloutTarget,
    StageStatus,
    TargetPhase,
    TargetState,
    TargetStatus,
)
from fleet_server.rollouts.targets import load_targets

_TARGETS = RolloutTarget.__table__  # type: ignore[attr-defined]

__all__ = [
    "backfill_bundle_grants",
    "create_rollout",
    "default_slot",
    "describe",
    "get_rollout",
    "list_rollouts",
]


def backfill_bundle_grants(session: Session) -> int:
    """Grant every device the bundles its rollouts assigned it (databases from before
    ``bundle_grants`` existed: a rollback must still be able to fetch the previous version).
    Returns how many grants were added; idempotent."""
    granted = {(g.device_id, g.bundle_sha256) for g in session.exec(select(BundleGrant)).all()}
    added = 0
    now = datetime.now(UTC)
    for target in session.exec(select(RolloutTarget)).all():
        if target.bundle_sha256 is None or target.phase in (
            TargetPhase.SCHEDULED,
            TargetPhase.EXCLUDED,
        ):
            continue
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
    engine: RolloutEngine,
    runner: BuildRunner,
    signer: FleetSigner,
    build_wait_s: float,
    include_targets: bool = True,
) -> RolloutPublic:
    """Bundles that do not exist yet are built first (by ``runner``), waiting up to
    ``build_wait_s``; past that, ConflictError ``build_pending`` names the builds and nothing
    has changed. Devices of a profile whose build fails are excluded, with the reason."""
    model, version = get_version(session, body.model, body.version)
    if body.hil is not None:
        hil_service.get_rig(session, body.hil.rig)  # refused before anything is written
    selector = body.cohort_selector()
    devices = _cohort_now(session, body.devices, selector)
    slot = body.slot or (f"{body.shadow_of}-shadow" if body.shadow_of else default_slot(model.name))
    if body.shadow_of is not None and body.shadow_of == slot:
        raise InvalidInputError("a shadow needs its own slot, not the one it shadows", field="slot")
    _check_overlap(session, slot, {d.id for d in devices}, body.supersedes)
    breaking = _schema_changes(session, body, model, version, body.shadow_of or slot, devices)
    choices = _bundles(session, runner, model, version, devices, signer, actor, build_wait_s)
    excluded = {d.id: choices[cohort_of(d)].excluded for d in devices}
    if all(excluded.values()):
        reasons = sorted({r for r in excluded.values() if r})
        raise ConversionError(
            f"no device of the cohort can get {model.name} {version.version}: "
            + "; ".join(reasons),
            reason="no_bundle",
        )

    with engine.lock:
        now = datetime.now(UTC)
        rollout = Rollout(
            id=uuid.uuid4().hex[:16],
            model_version_id=version.id or 0,
            slot=slot,
            selector=body.selector if isinstance(body.selector, dict) else None,
            cohort=str(selector) if isinstance(body.selector, str) and selector else None,
            devices=list(dict.fromkeys(body.devices)) if body.devices else None,
            plan={**body.plan(), **({"breaking": breaking} if breaking else {})},
            state=RolloutState.IN_PROGRESS,
            created_at=now,
            created_by=actor,
        )
        # Checked again under the slot's lock, held until the commit: two servers creating
        # overlapping rollouts at once cannot both pass (the first check, above, refuses
        # before any build is asked for).
        advisory_lock(session, f"slot/{slot}")
        superseded = _check_overlap(session, slot, {d.id for d in devices}, body.supersedes)
        session.add(rollout)
        session.flush()
        session.execute(
            insert(_TARGETS),
            [
                {
                    "rollout_id": rollout.id,
                    "device_id": device.id,
                    "bundle_sha256": choices[cohort_of(device)].sha256,
                    "phase": str(
                        TargetPhase.EXCLUDED if excluded[device.id] else TargetPhase.SCHEDULED
                    ),
                    "note": excluded[device.id],
                    "added_at": now,
                    "stage": 0,
                }
                for device in devices
            ],
        )
        if superseded is not None:
            _supersede(session, superseded, rollout, actor, now)
        if body.hil is not None:
            job = hil_service.create_job(
                session, rollout_id=rollout.id, rig=body.hil.rig, model=model.name,
                version=version.version, scenarios=body.hil.scenarios,
                timeout_s=body.hil.timeout_s, now=now,
            )  # fmt: skip
            session.add(
                RolloutEvent(
                    rollout_id=rollout.id, at=now, kind="hil_requested", stage=0, actor=actor,
                    message=f"stage 0 is a HIL run on rig {body.hil.rig}: no device of the "
                    f"fleet is notified until it passes (deadline {job.deadline_at:%H:%M:%S} UTC)",
                    figures={"job_id": job.id, "rig": body.hil.rig},
                )
            )  # fmt: skip
        session.add(
            RolloutEvent(
                rollout_id=rollout.id,
                at=now,
                kind="created",
                stage=0,
                actor=actor,
                message=f"{body.strategy} rollout of {model.name} {version.version} to "
                f"{len(devices)} device(s)",
                figures={
                    "devices": len(devices),
                    "excluded": sum(1 for r in excluded.values() if r),
                    "plan": rollout.plan,
                },
            )
        )
        if breaking:
            record(session, actor, "rollout.allow_breaking", rollout.id, model=model.name,
                   version=version.version, **breaking)  # fmt: skip
        record(
            session,
            actor,
            "rollout.create",
            rollout.id,
            model=model.name,
            version=version.version,
            devices=[d.id for d in devices][:1000],
            selector=body.selector,
            plan=rollout.plan,
            supersedes=body.supersedes,
        )
        session.commit()
        rollout_id = rollout.id
    # The engine notifies the first stage right after the answer (its next step, woken now):
    # a 10,000-device cohort's documents are not signed and published inside the request.
    engine.wake()
    session.expire_all()
    return get_rollout(session, rollout_id, include_targets=include_targets)


def _schema_changes(
    session: Session,
    body: RolloutCreate,
    model: MLModel,
    version: ModelVersion,
    slot: str,
    devices: list[DeviceRow],
) -> dict[str, Any] | None:
    """How the candidate's inputs and outputs differ from each version the cohort's slot
    serves. Refused (409 ``breaking_change``, naming every difference) unless the request
    says ``allow_breaking``; then returned, to be audited and kept in the plan."""
    stored = stored_slots(session, [d.id for d in devices])
    serving = {(s[slot]["model"], s[slot]["version"]) for s in stored.values() if slot in s}
    found: dict[str, list[str]] = {}
    for name, number in sorted(serving):
        if (name, number) == (model.name, version.version):
            continue
        try:
            _, old = get_version(session, name, number)
        except NotFoundError:
            continue
        changes = io_differences(old.inputs, old.outputs, version.inputs, version.outputs)
        if changes:
            found[f"{name} {number}"] = changes
    if not found:
        return None
    if not body.allow_breaking:
        listed = "; ".join(f"against {v}: " + ", ".join(c) for v, c in found.items())
        raise ConflictError(
            f"{model.name} {version.version} would break the callers of slot {slot!r}: "
            f"{listed}. Deploy it to a new slot, or say allow_breaking (audited)",
            reason="breaking_change",
            differences=found,
        )
    return {"slot": slot, "differences": found}


def _cohort_now(
    session: Session, device_ids: list[str] | None, selector: Selector | None
) -> list[DeviceRow]:
    if device_ids:
        unique = list(dict.fromkeys(device_ids))
        found = matching(session, unique, None)
        missing = [d for d in unique if d not in found]
        if missing:
            raise NotFoundError(
                f"not enrolled (or decommissioned): {', '.join(missing)}",
                device_ids=missing,
                field="devices",
            )
        return [found[d] for d in unique]
    devices = sorted(matching(session, None, selector).values(), key=lambda d: d.id)
    if not devices:
        raise InvalidInputError(
            f"no enrolled device matches the selector {str(selector)!r}", field="selector"
        )
    return devices


def _check_overlap(
    session: Session, slot: str, device_ids: set[str], supersedes: str | None
) -> Rollout | None:
    """The active rollout this one supersedes (checked), or None. Any other active rollout on
    ``slot`` holding one of ``device_ids`` is a conflict."""
    superseded: Rollout | None = None
    if supersedes is not None:
        superseded = session.get(Rollout, supersedes)
        if superseded is None:
            raise NotFoundError(f"no rollout {supersedes!r} to supersede", field="supersedes")
        if superseded.state not in ACTIVE_STATES:
            raise ConflictError(
                f"rollout {supersedes} is {superseded.state}; only an active rollout can be "
                "superseded",
                reason="rollout_state",
                field="supersedes",
            )
        if superseded.slot != slot:
            raise InvalidInputError(
                f"rollout {supersedes} deploys slot {superseded.slot!r}, not {slot!r}",
                field="supersedes",
            )
    rows = session.exec(
        select(RolloutTarget.rollout_id, RolloutTarget.device_id)
        .join(Rollout, col(Rollout.id) == col(RolloutTarget.rollout_id))
        .where(
            Rollout.slot == slot,
            col(Rollout.state).in_([str(s) for s in ACTIVE_STATES]),
            col(RolloutTarget.phase).in_([TargetPhase.SCHEDULED, TargetPhase.NOTIFIED]),
        )
    ).all()
    overlap: dict[str, int] = {}
    for rollout_id, device_id in rows:
        if device_id in device_ids and rollout_id != supersedes:
            overlap[rollout_id] = overlap.get(rollout_id, 0) + 1
    if overlap:
        other, count = sorted(overlap.items())[0]
        raise ConflictError(
            f"rollout {other} is still active on slot {slot!r} for {count} of these devices; "
            f"wait for it, abort it, or supersede it explicitly (supersedes: {other!r})",
            reason="overlapping_rollout",
            rollout_id=other,
            field="supersedes",
        )
    return superseded


def _supersede(session: Session, old: Rollout, new: Rollout, actor: str, now: datetime) -> None:
    locked = session.exec(select(Rollout).where(Rollout.id == old.id).with_for_update()).one()
    locked.state, locked.ended_at, locked.superseded_by = RolloutState.SUPERSEDED, now, new.id
    locked.reason = f"superseded by rollout {new.id}"
    session.add(locked)
    hil_service.cancel(session, old.id, f"the rollout was superseded by {new.id}", now)
    for target in session.exec(
        select(RolloutTarget).where(
            RolloutTarget.rollout_id == old.id, RolloutTarget.phase == TargetPhase.SCHEDULED
        )
    ).all():
        target.phase, target.note = TargetPhase.RELEASED, f"superseded by rollout {new.id}"
        session.add(target)
    session.add(
        RolloutEvent(
            rollout_id=old.id, at=now, kind="superseded", stage=locked.stage, actor=actor,
            message=f"superseded by rollout {new.id}", figures={"by": new.id},
        )
    )  # fmt: skip


def _bundles(
    session: Session,
    runner: BuildRunner,
    model: MLModel,
    version: ModelVersion,
    devices: list[DeviceRow],
    signer: FleetSigner,
    actor: str,
    build_wait_s: float,
) -> dict[tuple[str, tuple[str, ...] | None], BundleChoice]:
    # One build per cohort (profile x installed runtimes). Every missing build is queued
    # before any is awaited, so they run side by side.
    cohorts = sorted({cohort_of(d) for d in devices}, key=str)
    deadline = time.monotonic() + build_wait_s
    choices: dict[tuple[str, tuple[str, ...] | None], BundleChoice] = {}
    for final in (False, True):
        for cohort in cohorts:
            if cohort in choices and choices[cohort].pending_build is None:
                continue
            choices[cohort] = choose_bundle(
                session, runner, model, version, cohort, signer, actor,
                wait_s=max(0.0, deadline - time.monotonic()) if final else 0.0,
            )  # fmt: skip
    pending = [c.pending_build for c in choices.values() if c.pending_build]
    if pending:
        raise ConflictError(
            f"{len(pending)} build(s) for this rollout still running after {build_wait_s:.0f} s "
            f"({', '.join(pending)}); create the rollout again when they have succeeded "
            "(the CLI follows them and does this for you)",
            reason="build_pending",
            build_ids=pending,
        )
    return choices


# --- describing --------------------------------------------------------------------------------


def describe(
    session: Session,
    rollout: Rollout,
    *,
    include_targets: bool = True,
    now: datetime | None = None,
) -> RolloutPublic:
    now = now or datetime.now(UTC)
    model, version = version_by_id(session, rollout.model_version_id)
    plan = rollout.plan or _legacy_plan()
    timeout_s = float(str(plan.get("stage_timeout_s") or 1800))
    slot, staging = view_slot(rollout)
    targets = load_targets(session, rollout.id)
    devices = device_rows(session, [t.device_id for t in targets])
    job = hil_service.job_for_rollout(session, rollout.id)
    bundles = {
        b.sha256: b
        for b in session.exec(
            select(Bundle).where(col(Bundle.sha256).in_({t.bundle_sha256 for t in targets}))
        ).all()
    }
    views = [
        target_view(
            t,
            devices[t.device_id],
            slot,
            now=now,
            timeout_s=timeout_s,
            staging=staging,
            since=aware(rollout.activated_at) if rollout.activated_at else None,
        )
        for t in targets
        if t.device_id in devices
    ]
    stage_of = _stage_of(rollout, plan, views)
    counts = {str(s): 0 for s in TargetState}
    for v in views:
        counts[v.state] += 1
    statuses = []
    if include_targets:
        for v in views:
            bundle = bundles.get(v.target.bundle_sha256 or "")
            statuses.append(
                TargetStatus(
                    device_id=v.device.id,
                    profile=v.device.profile,
                    bundle_sha256=v.target.bundle_sha256,
                    runtime=bundle.runtime if bundle else None,
                    precision=bundle.precision if bundle else None,
                    state=v.state,
                    stage=stage_of.get(v.device.id, v.target.stage),
                    device_state=v.device_state,
                    online=v.device.online,
                    error=v.error,
                    note=v.target.note,
                )
            )
    events = [
        RolloutEventPublic.model_validate(e)
        for e in session.exec(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rollout.id)
            .order_by(col(RolloutEvent.id))
        ).all()
    ]
    gates = [GateFigure.model_validate(g) for g in (rollout.figures or {}).get("gates", [])]
    return RolloutPublic(
        id=rollout.id,
        model=model.name,
        version=version.version,
        slot=rollout.slot,
        selector=rollout.cohort if rollout.cohort is not None else rollout.selector,
        devices=rollout.devices,
        strategy=str(plan.get("strategy", "all_at_once")),
        plan=plan,
        created_at=aware(rollout.created_at),
        created_by=rollout.created_by,
        state=RolloutState(rollout.state),
        stage=rollout.stage,
        stage_started_at=aware(rollout.stage_started_at) if rollout.stage_started_at else None,
        ended_at=aware(rollout.ended_at) if rollout.ended_at else None,
        reason=rollout.reason,
        superseded_by=rollout.superseded_by,
        activated_at=aware(rollout.activated_at) if rollout.activated_at else None,
        counts=counts,
        stages=_stages(
            rollout,
            plan,
            views,
            stage_of,
            job is not None and job.state in OPEN_STATES,
            lacking=bool(lacking(gates)),
        ),
        gates=gates,
        awaiting=rollout.awaiting if rollout.state == RolloutState.AWAITING_APPROVAL else None,
        targets=statuses,
        events=events,
        hil=hil_service.public(job) if job is not None else None,
    )


def _legacy_plan() -> dict[str, Any]:
    return {"strategy": "all_at_once", "stages": [100.0], "gates": {}, "stage_timeout_s": 1800}


def _stage_of(rollout: Rollout, plan: dict[str, Any], views: list[TargetView]) -> dict[str, int]:
    """The stage each device is (or will be) in: a notified one, the stage that admitted it;
    a waiting one, the first stage whose quota reaches its place in the rollout's order."""
    stages = [float(p) for p in plan.get("stages") or [100.0]]
    eligible = in_order(rollout.id, views)
    quotas = [stage_quota(p, len(eligible)) for p in stages]
    out: dict[str, int] = {}
    for i, v in enumerate(eligible):
        if v.target.phase != TargetPhase.SCHEDULED:
            out[v.device.id] = v.target.stage
        else:
            out[v.device.id] = next((k for k, q in enumerate(quotas) if i < q), len(stages) - 1)
    return out


def _stages(
    rollout: Rollout,
    plan: dict[str, Any],
    views: list[TargetView],
    stage_of: dict[str, int],
    hil_open: bool = False,
    *,
    lacking: bool = False,
) -> list[StageStatus]:
    stages = [float(p) for p in plan.get("stages") or [100.0]]
    out = []
    for i, percent in enumerate(stages):
        mine = [v for v in views if stage_of.get(v.device.id) == i]
        counts = {"targeted": len(mine)}
        for v in mine:
            counts[v.state] = counts.get(v.state, 0) + 1
        counts["notified"] = sum(1 for v in mine if v.target.notified_at is not None)
        if i < rollout.stage:
            state = "passed"
        elif i > rollout.stage:
            state = "pending"
        elif rollout.state == RolloutState.IN_PROGRESS and hil_open:
            state = "waiting_for_hil"  # no device of the stage is notified before the rig passed
        elif rollout.state == RolloutState.IN_PROGRESS and rollout.stage_settled_at is not None:
            baked = aware(rollout.stage_settled_at) + timedelta(seconds=plan.get("bake_s") or 0)
            # Past the bake, gates still lacking evidence hold the stage.
            state = "waiting_for_evidence" if lacking and datetime.now(UTC) >= baked else "baking"
        elif rollout.state == RolloutState.IN_PROGRESS:
            state = "running"
        else:
            state = str(rollout.state)
        out.append(StageStatus(index=i, percent=percent, counts=counts, state=state))
    return out


def get_rollout(
    session: Session, rollout_id: str, *, include_targets: bool = True
) -> RolloutPublic:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}", rollout_id=rollout_id)
    return describe(session, rollout, include_targets=include_targets)


def list_rollouts(
    session: Session,
    *,
    include_targets: bool = True,
    model: str | None = None,
    version: str | None = None,
) -> list[RolloutPublic]:
    """Newest first; only those of ``model`` (and ``version``) when given."""
    query = select(Rollout).order_by(col(Rollout.created_at).desc())
    if model is not None:
        query = (
            query.join(ModelVersion, col(ModelVersion.id) == Rollout.model_version_id)
            .join(MLModel, col(MLModel.id) == ModelVersion.model_id)
            .where(MLModel.name == model)
        )
        if version is not None:
            query = query.where(ModelVersion.version == version)
    rows = session.exec(query).all()
    return [describe(session, r, include_targets=include_targets) for r in rows]
